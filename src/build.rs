//! Generates the MessageService's gRPC code from `src/store/message_service.proto` with the
//! vendored `protoc`, so a fresh machine needs nothing but the Rust toolchain.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // SAFETY: build scripts are single-threaded; nothing else reads the environment meanwhile.
    unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    tonic_prost_build::configure()
        .compile_protos(&["src/store/message_service.proto"], &["src/store"])?;
    println!("cargo:rerun-if-changed=src/store/message_service.proto");
    Ok(())
}
