// The public header must work from C++17: included twice (include guard), extern "C" linkage,
// no C-only constructs. Built with g++ -std=c++17 -Wall -Wextra -Werror.
#include "dcp.h"
#include "dcp.h"

#include <cstdio>
#include <cstring>

int main() {
    const char *v = dcp_version();
    if (v == nullptr || std::strlen(v) == 0) {
        std::fprintf(stderr, "dcp_version() returned an empty string\n");
        return 1;
    }
    // The enums and the opaque types are usable from C++.
    dcp_status s = DCP_OK;
    dcp_dtype d = DCP_BFLOAT16;
    dcp_key_info info{};
    dcp_state *state = nullptr;
    if (dcp_state_new(&state) != DCP_OK) {
        std::fprintf(stderr, "dcp_state_new failed: %s\n", dcp_last_error());
        return 1;
    }
    s = dcp_state_add_int(state, "step", 1);
    dcp_state_free(state);
    if (s != DCP_OK || d != 4 || info.fqn != nullptr ||
        std::strcmp(dcp_status_name(DCP_ERROR_MISMATCH), "DCP_ERROR_MISMATCH") != 0) {
        std::fprintf(stderr, "unexpected result from the C API in C++\n");
        return 1;
    }
    std::printf("header_cpp: libdcp %s usable from C++\n", v);
    return 0;
}
