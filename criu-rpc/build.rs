fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=proto/rpc.proto");
    prost_build::Config::new().compile_protos(&["proto/rpc.proto"], &["proto"])
}
