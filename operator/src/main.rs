fn main() {
    eprintln!("edgesync-operator: not implemented yet");
    std::process::exit(2);
}
