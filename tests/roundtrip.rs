//! Save/load through the safe Rust API on one process: every dtype, strides, boxes, objects,
//! overwrite rules, and damaged checkpoints.

use dcp::{load, save, Checkpoint, Context, DType, DirectIo, ErrorKind, LoadOptions, ObjectValue, SaveOptions, State, TensorView};

#[path = "common/tempdir.rs"]
mod tempdir;
use tempdir::TempDir;

fn tmp(name: &str) -> TempDir {
    TempDir::new(&format!("rt-{name}"))
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[test]
fn every_dtype_roundtrips_bit_exact() {
    let dir = tmp("dtypes");
    let ctx = Context::local();
    let dtypes = DType::ALL;
    let mut saved: Vec<Vec<u8>> = dtypes.iter().enumerate().map(|(i, d)| pattern(3 * 5 * d.size(), i as u8)).collect();
    {
        let mut st = State::new();
        for (d, buf) in dtypes.iter().zip(saved.iter_mut()) {
            st.add_tensor(&format!("t.{}", d.torch_name()), TensorView::from_bytes(buf, *d, &[3, 5]).unwrap())
                .unwrap();
        }
        st.add_bytes("blob", b"ab\0c\xff").unwrap();
        st.add_int("step", -7).unwrap();
        st.add_float("lr", 0.125).unwrap();
        st.add_literal("betas", "(0.9, 0.999)").unwrap();
        save(&ctx, &st, dir.s(), &SaveOptions::default()).unwrap();
    }
    let mut loaded: Vec<Vec<u8>> = saved.iter().map(|b| vec![0xAA; b.len()]).collect();
    let mut st = State::new();
    for (d, buf) in dtypes.iter().zip(loaded.iter_mut()) {
        st.add_tensor(&format!("t.{}", d.torch_name()), TensorView::from_bytes(buf, *d, &[3, 5]).unwrap())
            .unwrap();
    }
    st.add_bytes("blob", b"").unwrap();
    st.add_int("step", 0).unwrap();
    st.add_float("lr", 0.0).unwrap();
    st.add_int("betas", 0).unwrap();
    load(&ctx, &mut st, dir.s(), &LoadOptions::default()).unwrap();
    assert_eq!(st.object("blob").unwrap(), &ObjectValue::Bytes(b"ab\0c\xff".to_vec()));
    assert_eq!(st.object("step").unwrap(), &ObjectValue::Int(-7));
    assert_eq!(st.object("lr").unwrap(), &ObjectValue::Float(0.125));
    assert_eq!(
        st.object("betas").unwrap(),
        &ObjectValue::Py(dcp::PyValue::Tuple(vec![dcp::PyValue::Float(0.9), dcp::PyValue::Float(0.999)]))
    );
    drop(st);
    assert_eq!(loaded, saved);
}

#[test]
fn strided_views_and_boxes() {
    let dir = tmp("strided");
    let ctx = Context::local();
    // A 4x6 f32 matrix saved through its transposed view (sizes 6x4, strides 1,6).
    let mut base: Vec<f32> = (0..24).map(|i| i as f32).collect();
    {
        let mut st = State::new();
        // SAFETY: `base` holds the 24 f32s (96 bytes) the transposed view spans and outlives
        // `st`, which only reads it.
        let v = unsafe {
            TensorView::from_raw(
                base.as_mut_ptr() as *mut u8,
                96,
                DType::F32,
                &[6, 4],
                Some(&[1, 6]),
                dcp::Device::Cpu,
            )
            .unwrap()
        };
        st.add_tensor("wt", v).unwrap();
        save(&ctx, &st, dir.s(), &SaveOptions::default()).unwrap();
    }
    let expect = |i: usize, j: usize| base[j * 6 + i];
    let ck = Checkpoint::open(dir.s()).unwrap();
    let (dtype, shape, bytes) = ck.read_tensor("wt").unwrap();
    assert_eq!((dtype, shape.clone()), (DType::F32, vec![6, 4]));
    let full: Vec<f32> = bytes.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    for i in 0..6 {
        for j in 0..4 {
            assert_eq!(full[i * 4 + j], expect(i, j));
        }
    }
    // A box [1..4, 1..3] into a transposed destination.
    let mut dst = vec![0f32; 6];
    // SAFETY: `dst` holds the 6 f32s (24 bytes) the transposed 3x2 view spans; nothing else
    // touches it while `read_tensor_into`, which consumes the view, writes it.
    let v = unsafe {
        TensorView::from_raw(
            dst.as_mut_ptr() as *mut u8,
            24,
            DType::F32,
            &[3, 2],
            Some(&[1, 3]),
            dcp::Device::Cpu,
        )
        .unwrap()
    };
    ck.read_tensor_into("wt", &[1, 1], v, true).unwrap();
    for i in 0..3 {
        for j in 0..2 {
            assert_eq!(dst[j * 3 + i], expect(1 + i, 1 + j));
        }
    }
}

#[test]
fn overwrite_rules_and_missing_keys() {
    let dir = tmp("overwrite");
    let ctx = Context::local();
    let mut a = vec![1u8; 8];
    let mut st = State::new();
    st.add_tensor("a", TensorView::from_bytes(&mut a, DType::U8, &[8]).unwrap())
        .unwrap();
    save(&ctx, &st, dir.s(), &SaveOptions::default()).unwrap();
    let e = save(&ctx, &st, dir.s(), &SaveOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    assert!(
        e.message().contains("checkpoint already exists") && e.message().contains(dir.s()),
        "{e}"
    );
    save(&ctx, &st, dir.s(), &SaveOptions::default().overwrite(true)).unwrap();
    drop(st);

    let mut b = vec![0u8; 8];
    let mut c = vec![9u8; 2];
    let mut st = State::new();
    st.add_tensor("a", TensorView::from_bytes(&mut b, DType::U8, &[8]).unwrap())
        .unwrap();
    st.add_tensor("not_there", TensorView::from_bytes(&mut c, DType::U8, &[2]).unwrap())
        .unwrap();
    let e = load(&ctx, &mut st, dir.s(), &LoadOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(e.message().contains("not_there"), "{e}");
    let r = load(&ctx, &mut st, dir.s(), &LoadOptions::default().strict(false)).unwrap();
    assert_eq!(r.missing, vec!["not_there".to_string()]);
    assert_eq!(st.missing(), ["not_there".to_string()]);
    drop(st);
    assert_eq!(b, vec![1u8; 8]);
    assert_eq!(c, vec![9u8; 2]);
}

#[test]
fn damaged_checkpoints_are_refused() {
    let dir = tmp("damage");
    let ctx = Context::local();
    let mut data = pattern(1 << 16, 3);
    let mut st = State::new();
    st.add_tensor("w", TensorView::from_bytes(&mut data, DType::U8, &[256, 256]).unwrap())
        .unwrap();
    save(&ctx, &st, dir.s(), &SaveOptions::default()).unwrap();
    drop(st);
    let data_file = dir.join(file_starting(dir.path(), "__0_0_"));
    let pristine = std::fs::read(&data_file).unwrap();
    let try_load = || {
        let mut out = vec![0u8; 1 << 16];
        let mut st = State::new();
        st.add_tensor("w", TensorView::from_bytes(&mut out, DType::U8, &[256, 256]).unwrap())
            .unwrap();
        load(&ctx, &mut st, dir.s(), &LoadOptions::default())
    };
    try_load().unwrap();
    // A flipped byte in the payload.
    let mut m = pristine.clone();
    m[4096 + 1000] ^= 0x10;
    std::fs::write(&data_file, &m).unwrap();
    let e = try_load().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Checksum, "{e}");
    let file_name = data_file.file_name().unwrap().to_str().unwrap();
    assert!(e.message().contains("\"w\"") && e.message().contains(file_name), "{e}");
    // The same, structured: the key, the file, and where in it the bad bytes are.
    assert_eq!((e.key(), e.file()), (Some("w"), Some(file_name)), "{e:?}");
    let at = e.offset().expect("a checksum error names its offset");
    assert!(
        at <= 4096 + 1000 && 4096 + 1000 < at + (1 << 16),
        "offset {at} does not cover the flipped byte: {e}"
    );
    // A truncated data file.
    std::fs::write(&data_file, &pristine[..pristine.len() / 2]).unwrap();
    let e = try_load().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert_eq!(e.file(), Some(file_name), "{e:?}");
    std::fs::write(&data_file, &pristine).unwrap();
    // A garbled .metadata.
    let md = dir.join(".metadata");
    let md_bytes = std::fs::read(&md).unwrap();
    let mut g = md_bytes.clone();
    g[md_bytes.len() / 2] ^= 0xff;
    std::fs::write(&md, &g).unwrap();
    let e = try_load().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Checksum, "{e}");
    assert_eq!(e.file(), Some(".metadata"), "{e:?}");
    // Without the sidecar, the pickle itself is garbled.
    std::fs::remove_file(dir.join(file_starting(dir.path(), ".libdcp_"))).unwrap();
    let e = try_load().unwrap_err();
    assert_eq!(e.file(), Some(".metadata"), "{e:?}");
    // A truncated .metadata: the pickle ends early, at a byte the error names.
    std::fs::write(&md, &md_bytes[..md_bytes.len() / 2]).unwrap();
    let e = try_load().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert_eq!(e.file(), Some(".metadata"), "{e:?}");
    assert!(e.offset().is_some_and(|at| at <= md_bytes.len() as u64 / 2), "{e:?}");
    // No .metadata: not a committed checkpoint.
    std::fs::remove_file(&md).unwrap();
    let e = try_load().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(e.message().contains("not a committed checkpoint"), "{e}");
}

#[test]
fn async_save_holds_the_values_at_the_call() {
    let dir = tmp("async");
    let ctx = Context::local();
    let mut w: Vec<f32> = (0..1 << 20).map(|i| i as f32).collect();
    let mut strided: Vec<u16> = (0..64).collect();
    // Over two host-copy pieces (4 MiB each) with an odd tail: copied by several threads.
    // (Bytes that differ between pieces: `pattern` repeats every 256 bytes.)
    let mut big: Vec<u8> = (0..(10u64 << 20) + 3)
        .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
        .collect();
    let expect_big = big.clone();
    let expect_w = w.clone();
    let expect_t: Vec<u16> = (0..8).flat_map(|j| (0..8).map(move |i| (i * 8 + j) as u16)).collect();
    let fut = {
        let mut st = State::new();
        st.add_tensor("w", TensorView::from_slice(&w, &[1024, 1024]).unwrap()).unwrap();
        // SAFETY: `strided` holds the 64 u16s (128 bytes) the transposed view spans, and is
        // only written after `st` is gone (the async save copied it during the call).
        let t = unsafe {
            TensorView::from_raw(
                strided.as_mut_ptr() as *mut u8,
                128,
                DType::U16,
                &[8, 8],
                Some(&[1, 8]),
                dcp::Device::Cpu,
            )
            .unwrap()
        };
        st.add_tensor("t", t).unwrap();
        st.add_tensor("big", TensorView::from_slice(&big, &[big.len() as u64]).unwrap())
            .unwrap();
        st.add_int("step", 3).unwrap();
        dcp::save_async(&ctx, &st, dir.s(), &SaveOptions::default()).unwrap()
    };
    // The caller changes its tensors right away: the checkpoint keeps the old values.
    w.iter_mut().for_each(|x| *x = -1.0);
    strided.iter_mut().for_each(|x| *x = 999);
    big.iter_mut().for_each(|x| *x = 0x5A);
    // A second async save while one is in flight, told not to wait, is refused.
    let st = State::new();
    let busy = dcp::save_async(
        &ctx,
        &st,
        dir.join("other").to_str().unwrap(),
        &SaveOptions::default().wait_if_busy(false),
    );
    match busy {
        Err(e) => assert_eq!(e.kind(), ErrorKind::Busy),
        // Accepted only because the first save had already finished; then it completes.
        Ok(other) => {
            assert!(fut.is_done(), "a second async save was accepted while the first was in flight");
            other.wait().unwrap();
            Checkpoint::open(dir.join("other").to_str().unwrap()).unwrap();
        }
    }
    let report = fut.wait().unwrap();
    assert!(report.blocked_seconds <= report.seconds);
    let ck = Checkpoint::open(dir.s()).unwrap();
    let (_, _, bytes) = ck.read_tensor("w").unwrap();
    let got: Vec<f32> = bytes.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(got, expect_w);
    let (_, _, bytes) = ck.read_tensor("t").unwrap();
    let got: Vec<u16> = bytes.chunks(2).map(|c| u16::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(got, expect_t);
    let (_, _, bytes) = ck.read_tensor("big").unwrap();
    assert!(bytes == expect_big, "the 10 MiB tensor staged in pieces differs");
    assert_eq!(ck.read_object("step").unwrap(), ObjectValue::Int(3));
    // The staging buffer is kept for the next save.
    assert!(ctx.staging_stats().heap_bytes >= 4 << 20);
}

#[test]
fn stream_ordered_and_snapshot_options_stage_host_tensors_during_the_call() {
    let dir = tmp("async-ordered");
    let ctx = Context::local();
    let mut w: Vec<u32> = (0..300_000u32).map(|i| i.wrapping_mul(2_654_435_761)).collect();
    let expect = w.clone();
    let opts = SaveOptions::default().stream_ordered(true).device_snapshot_bytes(1 << 20);
    let fut = {
        let mut st = State::new();
        st.add_tensor("w", TensorView::from_slice(&w, &[w.len() as u64]).unwrap()).unwrap();
        dcp::save_async(&ctx, &st, dir.s(), &opts).unwrap()
    };
    w.iter_mut().for_each(|x| *x = 7);
    let r = fut.staging_report();
    assert_eq!((r.copied_bytes, r.device_snapshot_bytes, r.stream_ordered_bytes), (1_200_000, 0, 0));
    // Host tensors leave nothing to order: both forms are no-ops and need no GPU.
    fut.order_before(0).unwrap();
    fut.wait_staged().unwrap();
    fut.wait().unwrap();
    assert_eq!(ctx.device_snapshot_bytes(), 0);
    let (_, _, bytes) = Checkpoint::open(dir.s()).unwrap().read_tensor("w").unwrap();
    let got: Vec<u32> = bytes.chunks(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
    assert!(
        got == expect,
        "the stream-ordered save of a host tensor does not hold the values at the call"
    );
}

#[test]
fn direct_io_modes_read_the_same_bytes() {
    let dir = tmp("directio");
    let ctx = Context::local();
    let mut data = pattern(3 << 20, 9);
    let mut st = State::new();
    st.add_tensor("w", TensorView::from_bytes(&mut data, DType::U8, &[3, 1 << 20]).unwrap())
        .unwrap();
    save(&ctx, &st, dir.s(), &SaveOptions::default()).unwrap();
    drop(st);
    for mode in [DirectIo::On, DirectIo::Off, DirectIo::Auto] {
        // A box (rows 1..3, a column range) and the whole tensor.
        let mut part = vec![0u8; 2 * 1000];
        let mut whole = vec![0u8; 3 << 20];
        let mut st = State::new();
        st.add_tensor_chunk(
            "w",
            TensorView::from_bytes(&mut part, DType::U8, &[2, 1000]).unwrap(),
            &[3, 1 << 20],
            &[1, 4097],
        )
        .unwrap();
        load(&ctx, &mut st, dir.s(), &LoadOptions::default().direct_io(mode)).unwrap();
        drop(st);
        let mut st = State::new();
        st.add_tensor("w", TensorView::from_bytes(&mut whole, DType::U8, &[3, 1 << 20]).unwrap())
            .unwrap();
        load(&ctx, &mut st, dir.s(), &LoadOptions::default().direct_io(mode)).unwrap();
        drop(st);
        assert_eq!(whole, data, "{mode:?}");
        for r in 0..2 {
            assert_eq!(
                &part[r * 1000..(r + 1) * 1000],
                &data[(r + 1) * (1 << 20) + 4097..(r + 1) * (1 << 20) + 5097],
                "{mode:?}"
            );
        }
    }
}

/// The one file of `dir` whose name starts with `prefix` (file names carry a per-save token).
fn file_starting(dir: &std::path::Path, prefix: &str) -> String {
    let names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(prefix))
        .collect();
    assert_eq!(names.len(), 1, "files starting with {prefix:?} in {}: {names:?}", dir.display());
    names.into_iter().next().unwrap()
}

#[test]
fn typed_views_save_from_shared_slices_and_load_into_mutable_ones() {
    let dir = tmp("typed");
    let ctx = Context::local();
    let w: Vec<f64> = (0..12).map(|i| i as f64 * -1.25).collect();
    let ids: Vec<i64> = (0..5).map(|i| (i - 2) * 1_000_000_007).collect();
    let bits: Vec<u8> = pattern(6, 1); // bfloat16 x 3: a dtype with no Rust element type
    let mut st = State::new();
    st.add_tensor("w", TensorView::from_slice(&w, &[3, 4]).unwrap()).unwrap();
    st.add_tensor("ids", TensorView::from_slice(&ids, &[5]).unwrap()).unwrap();
    st.add_tensor("h", TensorView::from_bytes_ref(&bits, DType::BF16, &[3]).unwrap())
        .unwrap();
    save(&ctx, &st, dir.s(), &SaveOptions::default()).unwrap();

    // Loading into the same read-only views is refused before anything is written.
    let e = load(&ctx, &mut st, dir.s(), &LoadOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(e.message().contains("read-only"), "{e}");
    assert!(e.key().is_some(), "{e:?}");
    drop(st);

    let mut w2 = vec![f64::NAN; 12];
    let mut ids2 = vec![i64::MIN; 5];
    let mut bits2 = vec![0xA5u8; 6];
    let mut st = State::new();
    st.add_tensor("w", TensorView::from_slice_mut(&mut w2, &[3, 4]).unwrap()).unwrap();
    st.add_tensor("ids", TensorView::from_slice_mut(&mut ids2, &[5]).unwrap()).unwrap();
    st.add_tensor("h", TensorView::from_bytes(&mut bits2, DType::BF16, &[3]).unwrap())
        .unwrap();
    load(&ctx, &mut st, dir.s(), &LoadOptions::default()).unwrap();
    drop(st);
    let as_bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(as_bits(&w2), as_bits(&w));
    assert_eq!(ids2, ids);
    assert_eq!(bits2, bits);

    // The element type is the dtype: an f32 view of an f64 key is a mismatch.
    let mut wrong = vec![0f32; 12];
    let mut st = State::new();
    st.add_tensor("w", TensorView::from_slice_mut(&mut wrong, &[3, 4]).unwrap())
        .unwrap();
    let e = load(&ctx, &mut st, dir.s(), &LoadOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Mismatch, "{e}");
}

/// A strided payload whose bytes cross the write buffer's end in the middle of an element: a
/// contiguous payload of odd length written straight to the (buffered) file first leaves the
/// buffer starting at an odd file position, so buffer ends fall inside the f32 elements that
/// follow.
#[test]
fn strided_payload_split_mid_element_by_the_write_buffer() {
    let dir = tmp("strided-split");
    let ctx = Context::local();
    let mut odd = pattern((1 << 20) + 1, 7);
    let mut base: Vec<f32> = (0..256 * 256).map(|i| i as f32 * 0.5 + 1.0).collect();
    let expect: Vec<f32> = (0..256)
        .flat_map(|i| (0..256).map(move |j| (j * 256 + i) as f32 * 0.5 + 1.0))
        .collect();
    {
        let mut st = State::new();
        st.add_tensor("a", TensorView::from_bytes(&mut odd, DType::U8, &[(1 << 20) + 1]).unwrap())
            .unwrap();
        // SAFETY: `base` holds 256 * 256 f32s (the transposed view's whole extent) and outlives
        // `st`, which only reads it.
        let t = unsafe {
            TensorView::from_raw(
                base.as_mut_ptr() as *mut u8,
                256 * 256 * 4,
                DType::F32,
                &[256, 256],
                Some(&[1, 256]),
                dcp::Device::Cpu,
            )
            .unwrap()
        };
        st.add_tensor("b", t).unwrap();
        // Buffered I/O: O_DIRECT keeps the buffer's file position aligned.
        let opts = SaveOptions::default().buffer_bytes(4096 * 3).direct_io(false);
        save(&ctx, &st, dir.s(), &opts).unwrap();
    }
    let mut got = vec![f32::from_bits(0x7fc0_dead); 256 * 256];
    let mut odd_back = vec![0xAAu8; (1 << 20) + 1];
    let mut st = State::new();
    st.add_tensor("a", TensorView::from_bytes(&mut odd_back, DType::U8, &[(1 << 20) + 1]).unwrap())
        .unwrap();
    st.add_tensor("b", TensorView::from_slice_mut(&mut got, &[256, 256]).unwrap())
        .unwrap();
    load(&ctx, &mut st, dir.s(), &LoadOptions::default()).unwrap();
    drop(st);
    assert_eq!(odd_back, odd);
    assert!(
        got.iter().zip(&expect).all(|(g, e)| g.to_bits() == e.to_bits()),
        "strided payload differs after the round trip"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A sidecar whose checksum block size is not a whole number of elements (forged, with block
/// CRCs that match) would cut an element at the end of a read window, which would then be read
/// from past the window: the load refuses it instead.
#[test]
fn sidecar_block_size_that_cuts_elements_is_refused() {
    use dcp::format::sidecar::{Sidecar, BLOCK_SIZE};
    let dir = tmp("odd-blocks");
    let ctx = Context::local();
    // 80 MiB of f32: more than one 64 MiB read window.
    let n = 20usize << 20;
    let w: Vec<f32> = (0..n).map(|i| i as f32).collect();
    {
        let mut st = State::new();
        st.add_tensor("w", TensorView::from_slice(&w, &[n as u64]).unwrap()).unwrap();
        save(&ctx, &st, dir.s(), &SaveOptions::default()).unwrap();
    }
    let name = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .find(|n| n.starts_with(".libdcp"))
        .expect("a sidecar");
    let path = dir.join(name);
    let mut sc = Sidecar::decode(&std::fs::read(&path).unwrap(), "sidecar").unwrap();
    let bs = BLOCK_SIZE + 2;
    for b in &mut sc.blocks {
        let file = std::fs::read(dir.join(&sc.files[b.file as usize].name)).unwrap();
        let payload = &file[b.payload_offset as usize..(b.payload_offset + b.payload_len) as usize];
        b.crcs = payload.chunks(bs as usize).map(crc32fast::hash).collect();
    }
    assert!(!sc.blocks.is_empty());
    sc.block_size = bs;
    std::fs::write(&path, sc.encode()).unwrap();
    let mut got = vec![f32::from_bits(0x7fc0_dead); n];
    let mut st = State::new();
    st.add_tensor("w", TensorView::from_slice_mut(&mut got, &[n as u64]).unwrap())
        .unwrap();
    let e = load(&ctx, &mut st, dir.s(), &LoadOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.message().contains("block size"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
