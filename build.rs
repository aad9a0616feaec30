fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=proto/cri.proto");
    // Client only: the shim calls these on the upstream runtime; it serves its one
    // native method by hand and forwards everything else untouched.
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(&["proto/cri.proto"], &["proto"])
}
