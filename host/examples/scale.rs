//! Runs the scale scenario of issue 6 and prints what it measured:
//! `cargo run --release -p vsva-host --example scale [-- --small]`.

use vsva_host::scale::{run_scale, ScaleConfig};

fn main() {
    let small = std::env::args().any(|a| a == "--small");
    let cfg = if small {
        ScaleConfig::SMALL
    } else {
        ScaleConfig::ISSUE
    };
    match run_scale(&cfg) {
        Ok(report) => {
            println!("{report}");
            let problems = report.problems();
            for p in &problems {
                eprintln!("problem: {p}");
            }
            if !problems.is_empty() {
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("scale scenario: {e}");
            std::process::exit(2);
        }
    }
}
