//! `chatd completions SHELL`: prints the completion script (also committed in `completions/`).

use clap::Args;
use clap_complete::Shell;

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// bash, zsh, fish, elvish or powershell
    pub shell: Shell,
}

pub fn run(args: CompletionsArgs) -> anyhow::Result<()> {
    print!("{}", crate::cli::completions(args.shell));
    Ok(())
}
