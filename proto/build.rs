//! Compiles the lab's .proto files in pure Rust (protox), no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/enroll.proto",
        "proto/control.proto",
        "proto/operator.proto",
        "proto/link.proto",
        "proto/data.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    // The descriptor set, for clients that are not ours (grpcurl -protoset, Python's
    // protobuf): `srctl protoset --out FILE` writes it.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("failback.protoset"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .bytes(".failback.data.v1")
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
