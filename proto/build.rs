//! Generates the Rust types of `meshwatch/v1/*.proto` (needs `protoc` on PATH or in PROTOC).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=meshwatch/v1/store.proto");
    prost_build::Config::new().compile_protos(&["meshwatch/v1/store.proto"], &["."])?;
    Ok(())
}
