use std::path::PathBuf;

use prost::Message;

const FILES: &[&str] = &[
    "muster/v1/common.proto",
    "muster/v1/edge.proto",
    "muster/v1/presence.proto",
    "muster/v1/backplane.proto",
    "muster/v1/identity.proto",
    "muster/v1/approvals.proto",
    "muster/v1/execution.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    for file in FILES {
        println!("cargo:rerun-if-changed={}", root.join(file).display());
    }
    // protox compiles in pure Rust: no system protoc on any machine.
    let fds = protox::compile(FILES, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("muster_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
