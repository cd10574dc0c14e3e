//! Generates the gRPC code from `proto/` with protox, a pure-Rust protobuf
//! compiler (no system `protoc`), and keeps the encoded descriptor set for
//! gRPC server reflection.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/tagward/v1/tagward.proto"];
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(protos, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("tagward_descriptor.bin"), descriptors.encode_to_vec())?;
    // google.protobuf.Duration, which the google.rpc error details import:
    // reflection must be able to hand it to clients such as grpcurl.
    let duration = protox::compile(["google/protobuf/duration.proto"], ["proto"])?;
    std::fs::write(out_dir.join("duration_descriptor.bin"), duration.encode_to_vec())?;
    // A message that does not decode is INVALID_ARGUMENT (src/grpc/codec.rs).
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::grpc::codec::Checked")
        .compile_fds(descriptors)?;
    // The subset of etcd's v3 API that fleet mode uses (`--store etcd://`),
    // declared in proto/etcd/ with etcd's names and field numbers: a client
    // only, and not served by reflection.
    let etcd = protox::compile(["etcd/etcd.proto"], ["proto"])?;
    tonic_prost_build::configure().build_client(true).build_server(false).compile_fds(etcd)?;
    Ok(())
}
