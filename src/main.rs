fn main() {
    std::process::exit(mbridge::cli::main());
}
