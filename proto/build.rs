//! Generates the Rust types of `meshwatch/v1/*.proto`. The files are parsed by `protox`, a
//! protobuf compiler in Rust, so that building meshwatch needs cargo alone (no `protoc`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=meshwatch/v1/store.proto");
    let descriptors = protox::compile(["meshwatch/v1/store.proto"], ["."])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
