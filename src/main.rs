//! The `tagward` command: thin wiring from the command line to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use tagward::scenario::{self, Backend, InProcess};

#[derive(Parser)]
#[command(name = "tagward", version, about = "An authorization sidecar that decides like AWS IAM and KMS with tag-based access control")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run scenario files (JSON or YAML; directories are searched
    /// recursively) and report every failing step. Exit code 0 when all
    /// steps pass, 1 when a step fails, 2 when a file cannot be loaded.
    Test {
        /// Scenario files or directories.
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Test { paths } => run_tests(&paths, &mut InProcess::default()),
    }
}

fn run_tests(paths: &[PathBuf], backend: &mut dyn Backend) -> ExitCode {
    let (files, mut load_failed) = match scenario::collect(paths) {
        Ok(files) => (files, false),
        Err(e) => {
            eprintln!("{e}");
            (Vec::new(), true)
        }
    };
    let (mut passed, mut failed) = (0usize, 0usize);
    for file in &files {
        match scenario::load(file) {
            Ok(s) => {
                let report = scenario::run(&s, backend);
                passed += report.passed;
                failed += report.failures.len();
                for line in &report.failures {
                    println!("{line}");
                }
            }
            Err(e) => {
                eprintln!("{e}");
                load_failed = true;
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if load_failed {
        ExitCode::from(2)
    } else if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
