//! `chatd token --user U [--ttl 1h]`: prints an HS256 token signed with the configured
//! `[auth] secret`, for clients, operators and `crossnode-test` against token-mode nodes.

use anyhow::bail;
use clap::Args;

use super::ConfigArgs;
use crate::chat::ids::now_ms;
use crate::config::Overrides;
use crate::protocol::is_valid_user_id;

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The user the token names (its `sub`)
    #[arg(long)]
    pub user: String,
    /// How long the token is valid: 90s, 15m, 1h, 7d
    #[arg(long, default_value = "1h", value_parser = parse_ttl)]
    pub ttl: u64,
    #[command(flatten)]
    pub layers: ConfigArgs,
}

/// `90s`, `15m`, `1h`, `7d` (or plain seconds) to seconds.
pub fn parse_ttl(s: &str) -> Result<u64, String> {
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?}: expected a number and s, m, h or d"))?;
    let factor = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    match n.checked_mul(factor) {
        Some(0) | None => Err(format!("{s:?}: must be at least 1 s and sane")),
        Some(secs) => Ok(secs),
    }
}

pub fn run(args: TokenArgs) -> anyhow::Result<()> {
    let config = args.layers.load(Overrides::default())?;
    if config.auth.secret.len() < 32 {
        bail!(
            "auth.secret is not set (or shorter than 32 bytes) in this configuration: \
             set [auth] secret, or CHATD_AUTH__SECRET, as the nodes have it"
        );
    }
    if !is_valid_user_id(&args.user) {
        bail!(
            "--user {:?} is not a user id ([A-Za-z0-9_.:@-]{{1,64}})",
            args.user
        );
    }
    let now = now_ms() / 1000;
    println!(
        "{}",
        crate::auth::mint(&config.auth.secret, &args.user, args.ttl, now)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls() {
        assert_eq!(parse_ttl("90s"), Ok(90));
        assert_eq!(parse_ttl("15m"), Ok(900));
        assert_eq!(parse_ttl("1h"), Ok(3600));
        assert_eq!(parse_ttl("7d"), Ok(604_800));
        assert_eq!(parse_ttl("42"), Ok(42));
        assert!(parse_ttl("0s").is_err() && parse_ttl("1w").is_err() && parse_ttl("h").is_err());
    }
}
