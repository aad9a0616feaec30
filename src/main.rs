fn main() {
    eprintln!("ckpt-shim: no commands yet");
    std::process::exit(2);
}
