//! Replays every committed corpus and regression input through the fuzz
//! targets' bodies, as ordinary tests on the stable toolchain (CI runs
//! `cargo test --release --manifest-path fuzz/Cargo.toml`). A target
//! without a corpus fails: replaying nothing proves nothing.

use std::path::Path;

fn replay(target: &str, f: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    for dir in ["corpus", "regressions"] {
        let d = root.join(dir).join(target);
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        let mut files: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        files.sort();
        for p in files {
            let data = std::fs::read(&p).expect("corpus file");
            f(&data);
            n += 1;
        }
    }
    println!("{target}: replayed {n} inputs");
    assert!(n > 0, "{target}: no corpus under fuzz/corpus/{target}");
}

#[test]
fn loader_bzimage() {
    replay("loader_bzimage", duet_fuzz::loader_bzimage);
}

#[test]
fn loader_elf_pvh() {
    replay("loader_elf_pvh", duet_fuzz::loader_elf_pvh);
}

#[test]
fn loader_multiboot() {
    replay("loader_multiboot", duet_fuzz::loader_multiboot);
}

#[test]
fn cpu_exec() {
    replay("cpu_exec", duet_fuzz::cpu_exec);
}

#[test]
fn device_registers() {
    replay("device_registers", duet_fuzz::device_registers);
}

#[test]
fn virtio_devices() {
    replay("virtio_devices", duet_fuzz::virtio_devices);
}

#[test]
fn replay_log() {
    replay("replay_log", duet_fuzz::replay_log);
}

#[test]
fn e1000() {
    replay("e1000", duet_fuzz::e1000);
}
