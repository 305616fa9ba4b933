//! The streaming NAR unpacker never panics or writes outside its
//! destination, and whatever it accepts dumps back to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use nix_snapshotter::nixfmt::nar;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("out");
    let mut reader = data;
    if nar::unpack(&mut reader, &dest).is_ok() {
        let consumed = data.len() - reader.len();
        let mut again = Vec::new();
        nar::dump(&dest, &mut again).unwrap();
        assert_eq!(&data[..consumed], &again[..], "accepted NAR does not round-trip");
    }
    // Nothing but `out` may exist in the directory.
    let entries: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(entries.len() <= 1);
    let _ = nix_snapshotter::store::gc::remove_tree(&dest);
});
