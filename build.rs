//! Generates the protocol types from `proto/fastport.proto` with prost, compiling the
//! schema with protox so that no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/fastport.proto");
    let descriptors = protox::compile(["proto/fastport.proto"], ["proto"])?;
    prost_build::Config::new()
        // Payloads and ids are `bytes::Bytes`, so a delivery is shared, never copied.
        .bytes(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
