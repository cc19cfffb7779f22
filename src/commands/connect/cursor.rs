//! `chatd connect`'s cursor: the last seq the user's devices saw through it, kept in a state
//! file so that the next connect asks for what was missed (`?since=`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};
use tokio::time::Instant;

/// The user's state file: the last seq seen. Written atomically (a temp file of this
/// process, then rename) at most every [`Cursor::EVERY`], and at every disconnect and exit.
/// One file per user, so clients of different users on one machine never write the same
/// file.
pub struct Cursor {
    user: String,
    path: Option<PathBuf>,
    seq: Option<u64>,
    dirty: bool,
    last_write: Instant,
}

impl Cursor {
    pub const EVERY: Duration = Duration::from_millis(250);

    fn default_dir() -> Option<PathBuf> {
        let base = std::env::var_os("XDG_STATE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))?;
        Some(base.join("chatd"))
    }

    /// Reads `{dir}/{user}.cursor` (user ids hold no `/`); none yet is no cursor.
    pub fn open(dir: Option<PathBuf>, user: &str) -> anyhow::Result<Cursor> {
        let path = dir
            .or_else(Self::default_dir)
            .map(|d| d.join(format!("{user}.cursor")));
        let seq = match &path {
            Some(p) => match std::fs::read_to_string(p) {
                Ok(text) => {
                    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                    Some(v["seq"].as_u64().with_context(|| {
                        format!(
                            "state file {} is not {{\"userId\": ..., \"seq\": N}}; fix or delete it",
                            p.display()
                        )
                    })?)
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(e).with_context(|| format!("cannot read {}", p.display())),
            },
            None => None,
        };
        Ok(Cursor {
            user: user.to_string(),
            path,
            seq,
            dirty: false,
            last_write: Instant::now(),
        })
    }

    pub fn get(&self) -> Option<u64> {
        self.seq
    }

    /// Records `seq` as seen (the highest wins).
    pub fn saw(&mut self, seq: u64) {
        if self.seq.is_none_or(|c| seq > c) {
            self.seq = Some(seq);
            self.dirty = true;
        }
    }

    /// Sets the cursor, also backwards.
    pub fn set(&mut self, seq: u64) {
        if self.seq.replace(seq) != Some(seq) {
            self.dirty = true;
        }
    }

    pub async fn save_soon(&mut self) {
        if self.dirty && self.last_write.elapsed() >= Self::EVERY {
            self.save().await;
        }
    }

    /// Writes the cursor to a temporary file and renames it over the state file, so a crash
    /// leaves the old cursor or the new one. Through tokio::fs: the session loop is not held.
    pub async fn save(&mut self) {
        let (Some(path), Some(seq)) = (&self.path, self.seq) else {
            return;
        };
        if !self.dirty {
            return;
        }
        let text = json!({"userId": self.user, "seq": seq}).to_string();
        let write = async {
            if let Some(dir) = path.parent() {
                tokio::fs::create_dir_all(dir).await?;
            }
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            tokio::fs::write(&tmp, text).await?;
            tokio::fs::rename(&tmp, path).await
        };
        match write.await {
            Ok(()) => self.dirty = false,
            Err(e) => eprintln!("cannot write the state file {}: {e}", path.display()),
        }
        self.last_write = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        std::env::temp_dir().join(format!("chatd-cursor-{}-{n}", std::process::id()))
    }

    #[tokio::test]
    async fn a_saved_cursor_is_read_back_and_no_temp_file_is_left() {
        let d = dir();
        let mut c = Cursor::open(Some(d.clone()), "alice").unwrap();
        assert_eq!(c.get(), None, "no state file yet: no cursor");
        c.saw(7);
        c.saw(5);
        assert_eq!(c.get(), Some(7), "the highest seen wins");
        c.save().await;
        let again = Cursor::open(Some(d.clone()), "alice").unwrap();
        assert_eq!(again.get(), Some(7));
        let names: Vec<String> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["alice.cursor"]);
        assert_eq!(
            Cursor::open(Some(d.clone()), "bob").unwrap().get(),
            None,
            "one file per user"
        );
    }

    #[tokio::test]
    async fn set_moves_the_cursor_back_and_save_soon_waits_its_turn() {
        let d = dir();
        let mut c = Cursor::open(Some(d.clone()), "carol").unwrap();
        c.saw(10);
        c.save().await;
        c.set(3);
        assert_eq!(c.get(), Some(3), "SYNCED is authoritative, also backwards");
        // Written less than EVERY ago: not yet.
        c.save_soon().await;
        assert_eq!(
            Cursor::open(Some(d.clone()), "carol").unwrap().get(),
            Some(10)
        );
        c.save().await;
        assert_eq!(Cursor::open(Some(d), "carol").unwrap().get(), Some(3));
    }

    #[test]
    fn a_broken_state_file_is_an_error_that_names_it() {
        let d = dir();
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("dave.cursor"), "not json").unwrap();
        let err = Cursor::open(Some(d.clone()), "dave").err().unwrap();
        let text = format!("{err:#}");
        assert!(
            text.contains("dave.cursor") && text.contains("delete it"),
            "{text}"
        );
    }
}
