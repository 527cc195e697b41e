# CMake package of libdcp, installed by scripts/install.sh PREFIX into PREFIX/lib/cmake/dcp.
#
#   find_package(dcp REQUIRED)        # -Ddcp_DIR=PREFIX/lib/cmake/dcp or CMAKE_PREFIX_PATH=PREFIX
#   target_link_libraries(app PRIVATE dcp::dcp)
#
# Targets:
#   dcp::dcp           libdcp.so with PREFIX/include (dcp.h, dcp.hpp, dcp_torch.hpp, dcp_c10d.hpp)
#   dcp::dcp_static    libdcp.a (plus the system libraries it needs), when installed
#   dcp::gloo_headers  the gloo headers LibTorch's ProcessGroupGloo.hpp needs (the pip wheels
#                      lack them) and USE_C10D_GLOO: link it to construct a c10d::ProcessGroupGloo
# The package is relocatable: paths are relative to this file.
get_filename_component(_dcp_prefix "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)

if(NOT TARGET dcp::dcp)
  if(NOT EXISTS "${_dcp_prefix}/lib/libdcp.so" OR NOT EXISTS "${_dcp_prefix}/include/dcp.h")
    set(dcp_FOUND FALSE)
    set(dcp_NOT_FOUND_MESSAGE "libdcp.so or dcp.h missing under ${_dcp_prefix}: run scripts/install.sh again")
    return()
  endif()
  add_library(dcp::dcp SHARED IMPORTED)
  set_target_properties(dcp::dcp PROPERTIES
    IMPORTED_LOCATION "${_dcp_prefix}/lib/libdcp.so"
    IMPORTED_NO_SONAME TRUE
    INTERFACE_INCLUDE_DIRECTORIES "${_dcp_prefix}/include")

  if(EXISTS "${_dcp_prefix}/lib/libdcp.a")
    add_library(dcp::dcp_static STATIC IMPORTED)
    set_target_properties(dcp::dcp_static PROPERTIES
      IMPORTED_LOCATION "${_dcp_prefix}/lib/libdcp.a"
      INTERFACE_INCLUDE_DIRECTORIES "${_dcp_prefix}/include"
      INTERFACE_LINK_LIBRARIES "pthread;dl;m")
  endif()

  add_library(dcp::gloo_headers INTERFACE IMPORTED)
  set_target_properties(dcp::gloo_headers PROPERTIES
    INTERFACE_INCLUDE_DIRECTORIES "${_dcp_prefix}/include/dcp/third_party"
    INTERFACE_COMPILE_DEFINITIONS "USE_C10D_GLOO")
endif()

set(dcp_INCLUDE_DIRS "${_dcp_prefix}/include")
set(dcp_LIBRARIES dcp::dcp)
unset(_dcp_prefix)
