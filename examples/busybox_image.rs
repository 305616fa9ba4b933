//! Writes the two-layer busybox OCI image archive the tests and the demo use.
//!
//!     busybox_image OUT.tar IMAGE-NAME

#[allow(dead_code)]
#[path = "../tests/common/image.rs"]
mod image;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: busybox_image OUT.tar IMAGE-NAME");
        std::process::exit(2);
    }
    image::busybox_two_layers(std::path::Path::new(&args[1]), &args[2]);
}
