fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=proto/rpc.proto");
    println!("cargo:rerun-if-changed=proto/image.proto");
    prost_build::Config::new().compile_protos(&["proto/rpc.proto", "proto/image.proto"], &["proto"])
}
