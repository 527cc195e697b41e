//! Plan caching across saves, with 4 ranks as threads over the TCP rendezvous: an unchanged
//! layout reuses the cached global plan (no plan exchange); a changed layout rebuilds it.

use dcp::comm::tcp::TcpComm;
use dcp::{load, save, Context, LoadOptions, SaveOptions, State, TensorView};
use std::time::Duration;

#[path = "common/tempdir.rs"]
mod tempdir;
use tempdir::TempDir;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn unchanged_layout_reuses_the_plan() {
    let world = 4;
    let port = free_port();
    let scratch = TempDir::new("plancache");
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let dir = scratch.to_path_buf();
            std::thread::spawn(move || {
                let ctx = Context::with_communicator(Box::new(
                    TcpComm::connect(rank, world, "127.0.0.1", port, Duration::from_secs(30)).unwrap(),
                ));
                let path = dir.to_str().unwrap();
                // Explicit, rank-specific chunks: the first save must exchange plans.
                let rows: Vec<f32> = (0..8).map(|i| (rank * 8 + i) as f32).collect();
                let opts = SaveOptions::default().overwrite(true);
                let mut cached = Vec::new();
                for _ in 0..3 {
                    let mut st = State::new();
                    st.add_tensor_chunk("w", TensorView::from_slice(&rows, &[2, 4]).unwrap(), &[8, 4], &[2 * rank as u64, 0])
                        .unwrap();
                    cached.push(save(&ctx, &st, path, &opts).unwrap().plan_cached);
                }
                // A different layout (one more key) is planned afresh.
                let extra = [1u8; 3];
                let mut st = State::new();
                st.add_tensor_chunk("w", TensorView::from_slice(&rows, &[2, 4]).unwrap(), &[8, 4], &[2 * rank as u64, 0])
                    .unwrap();
                st.add_tensor("b", TensorView::from_slice(&extra, &[3]).unwrap()).unwrap();
                cached.push(save(&ctx, &st, path, &opts).unwrap().plan_cached);
                // And the checkpoint loads: every rank reads the whole tensor.
                let mut all = vec![f32::NAN; 32];
                let mut st = State::new();
                st.add_tensor("w", TensorView::from_slice_mut(&mut all, &[8, 4]).unwrap()).unwrap();
                load(&ctx, &mut st, path, &LoadOptions::default()).unwrap();
                drop(st);
                assert_eq!(all, (0..32).map(|i| i as f32).collect::<Vec<_>>());
                cached
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), vec![false, true, true, false]);
    }
}
