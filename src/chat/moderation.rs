//! Content moderation: one Aho-Corasick automaton over the configured word list, matched
//! case-insensitively (Unicode lowercase) anywhere in the content; cost grows with the content,
//! not with the number of words.

use std::borrow::Cow;
use std::path::Path;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};

use crate::config::{ModerationAction, ModerationConfig};

pub struct Moderator {
    /// `None` when the list is empty: every message passes untouched.
    automaton: Option<AhoCorasick>,
    action: ModerationAction,
    words: usize,
}

/// A message moderation refused; carries nothing of the word so clients cannot probe the list.
#[derive(Debug, PartialEq, Eq)]
pub struct Rejected;

#[derive(Debug, thiserror::Error)]
pub enum ModerationError {
    #[error("moderation.words_file {path}: {source}")]
    WordsFile {
        path: String,
        source: std::io::Error,
    },
    #[error("moderation word list: {0}")]
    Build(#[from] aho_corasick::BuildError),
}

impl Moderator {
    pub fn from_config(config: &ModerationConfig) -> Result<Self, ModerationError> {
        let mut words: Vec<String> = config.words.clone();
        if !config.words_file.is_empty() {
            words.extend(
                read_words_file(Path::new(&config.words_file)).map_err(|source| {
                    ModerationError::WordsFile {
                        path: config.words_file.clone(),
                        source,
                    }
                })?,
            );
        }
        Self::new(words, config.action)
    }

    pub fn new(words: Vec<String>, action: ModerationAction) -> Result<Self, ModerationError> {
        let mut patterns: Vec<String> = words
            .iter()
            .map(|w| w.trim().to_lowercase())
            .filter(|w| !w.is_empty())
            .collect();
        patterns.sort();
        patterns.dedup();
        let count = patterns.len();
        let automaton = if patterns.is_empty() {
            None
        } else {
            Some(
                AhoCorasickBuilder::new()
                    .ascii_case_insensitive(true)
                    .match_kind(MatchKind::Standard)
                    .build(&patterns)?,
            )
        };
        Ok(Self {
            automaton,
            action,
            words: count,
        })
    }

    pub fn word_count(&self) -> usize {
        self.words
    }

    /// The content to store and deliver (masked when needed), or [`Rejected`].
    pub fn check<'a>(&self, content: &'a str) -> Result<Cow<'a, str>, Rejected> {
        let Some(ac) = &self.automaton else {
            return Ok(Cow::Borrowed(content));
        };
        let spans = matched_spans(ac, content);
        if spans.is_empty() {
            return Ok(Cow::Borrowed(content));
        }
        match self.action {
            ModerationAction::Reject => Err(Rejected),
            ModerationAction::Mask => Ok(Cow::Owned(mask(content, &spans))),
        }
    }
}

fn read_words_file(path: &Path) -> std::io::Result<Vec<String>> {
    Ok(std::fs::read_to_string(path)?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect())
}

/// Byte ranges of `content` covered by any word, possibly overlapping.
fn matched_spans(ac: &AhoCorasick, content: &str) -> Vec<(usize, usize)> {
    if content.is_ascii() {
        // ASCII case folding is done by the automaton itself: no copy of the content.
        return ac
            .find_overlapping_iter(content)
            .map(|m| (m.start(), m.end()))
            .collect();
    }
    // Lowercase a copy, remembering for every byte of it which original character it came
    // from, so that matches map back even where lowercasing changes the length.
    let mut lowered = String::with_capacity(content.len());
    let mut origin: Vec<(usize, usize)> = Vec::with_capacity(content.len());
    for (start, ch) in content.char_indices() {
        let end = start + ch.len_utf8();
        for lc in ch.to_lowercase() {
            lowered.push(lc);
            origin.extend(std::iter::repeat_n((start, end), lc.len_utf8()));
        }
    }
    ac.find_overlapping_iter(&lowered)
        .map(|m| (origin[m.start()].0, origin[m.end() - 1].1))
        .collect()
}

fn mask(content: &str, spans: &[(usize, usize)]) -> String {
    let mut covered = vec![false; content.len()];
    for &(start, end) in spans {
        covered[start..end].fill(true);
    }
    content
        .char_indices()
        .map(|(i, ch)| if covered[i] { '*' } else { ch })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moderator(words: &[&str], action: ModerationAction) -> Moderator {
        Moderator::new(words.iter().map(|w| w.to_string()).collect(), action).unwrap()
    }

    #[test]
    fn masks_case_insensitively() {
        let m = moderator(&["darn", "heck"], ModerationAction::Mask);
        assert_eq!(m.check("Oh DARN it, heck!").unwrap(), "Oh **** it, ****!");
        assert!(matches!(m.check("all fine"), Ok(Cow::Borrowed("all fine"))));
    }

    #[test]
    fn masks_unicode_and_overlaps() {
        let m = moderator(&["straße", "ab", "bc"], ModerationAction::Mask);
        assert_eq!(
            m.check("Die STRASSE, die Straße, ÄBc").unwrap(),
            "Die STRASSE, die ******, Ä**"
        );
        let m = moderator(&["坏蛋"], ModerationAction::Mask);
        assert_eq!(m.check("你是坏蛋吗").unwrap(), "你是**吗");
        // 'İ' lowercases to two chars; the mask still covers exactly one original char.
        let m = moderator(&["i\u{307}x"], ModerationAction::Mask);
        assert_eq!(m.check("aİxb").unwrap(), "a**b");
    }

    #[test]
    fn rejects() {
        let m = moderator(&["spam"], ModerationAction::Reject);
        assert_eq!(m.check("buy SPAM now"), Err(Rejected));
        assert!(m.check("buy ham now").is_ok());
    }

    #[test]
    fn empty_list_passes_everything() {
        let m = moderator(&[], ModerationAction::Reject);
        assert_eq!(m.word_count(), 0);
        assert!(m.check("anything").is_ok());
    }

    #[test]
    fn long_list_is_one_automaton() {
        let words: Vec<String> = (0..50_000).map(|i| format!("badword{i:05}x")).collect();
        let m = Moderator::new(words, ModerationAction::Mask).unwrap();
        assert_eq!(m.word_count(), 50_000);
        assert_eq!(
            m.check("a badword04711x b").unwrap(),
            format!("a {} b", "*".repeat(13))
        );
        assert!(m.check("badword0471 is fine").is_ok());
    }

    #[test]
    fn words_file_with_comments() {
        let path = std::env::temp_dir().join(format!("chatd-words-{}.txt", std::process::id()));
        std::fs::write(&path, "# list\nfoo\n\n  bar  \n").unwrap();
        let cfg = ModerationConfig {
            action: ModerationAction::Mask,
            words: vec!["baz".into()],
            words_file: path.display().to_string(),
        };
        let m = Moderator::from_config(&cfg).unwrap();
        assert_eq!(m.word_count(), 3);
        assert_eq!(m.check("foo bar baz qux").unwrap(), "*** *** *** qux");
        let missing = ModerationConfig {
            words_file: "/nonexistent/words".into(),
            ..cfg
        };
        let err = Moderator::from_config(&missing).err().unwrap().to_string();
        assert!(err.contains("/nonexistent/words"), "{err}");
    }
}
