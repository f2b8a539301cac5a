//! Compiles `ironblock/v1/*.proto` and `csi/v1/csi.proto` with the pure-Rust
//! `protox` compiler (no `protoc` binary needed) and hands the descriptor
//! sets to tonic's generator.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["ironblock/v1/meta.proto", "ironblock/v1/replica.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["."])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Replica payloads stay zero-copy `bytes::Bytes`.
        .bytes(".ironblock.v1.ReplicaWriteRequest.data")
        .bytes(".ironblock.v1.ReplicaReadResponse.data")
        .bytes(".ironblock.v1.ReplicaRepairRequest.data")
        .compile_fds(fds)?;

    // The CSI spec (package csi.v1). Well-known types map to prost-types.
    let csi = ["csi/v1/csi.proto"];
    for p in &csi {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(csi, ["."])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
