//! Entry point: parse the command line, set up logging, run, map errors to exit codes
//! (0 success, 1 failure, 2 usage error, 3 invalid configuration).

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use chatd::cli::{self, Cli};
use chatd::config::ConfigError;

/// mimalloc rather than glibc's malloc: a node whose store is full (every message stored
/// evicts one) spent a quarter of its CPU in glibc's malloc and free, much of it consolidating
/// fragments; see the README's single-node figures.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_arena_eager_commit` (mimalloc's `include/mimalloc.h`, v2 and v3 alike; the
/// bindings of libmimalloc-sys do not name it).
#[cfg(target_os = "linux")]
const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// Runs before anything allocates (a constructor of the executable): arenas are committed as
/// they are used, not when reserved. Measured (`chatd bench --spawn --pairs 50 --messages 8000
/// --idle 9000`, 3 runs each): glibc 11.3-12.1 µs of node CPU per message, 9.6 KiB per idle
/// connection; mimalloc 7.5-8.3 µs, 10.8-11.2 KiB; mimalloc with this 8.4-8.6 µs, 10.0 KiB.
#[cfg(target_os = "linux")]
extern "C" fn allocator_options() {
    // SAFETY: sets one option of the allocator; no thread exists yet.
    unsafe { libmimalloc_sys::mi_option_set(ARENA_EAGER_COMMIT, 0) };
}

#[cfg(target_os = "linux")]
#[used]
#[link_section = ".init_array"]
static ALLOCATOR_OPTIONS: extern "C" fn() = allocator_options;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(cli.command.default_log_level()));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(cli::run(cli));
    // A blocking read of stdin (`connect`) would otherwise keep the process alive after
    // `/quit` until the user presses Enter again.
    runtime.shutdown_timeout(Duration::from_millis(200));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<ConfigError>().is_some() {
                ExitCode::from(3)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
