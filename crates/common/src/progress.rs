//! Progress of long work. Libraries report through [`Progress`]; only a build with the
//! `progress` feature (the `umbra` binary) draws a bar, on stderr and only on a terminal.

/// A progress handle: a bar on stderr with the `progress` feature, silent otherwise.
#[derive(Debug, Clone)]
pub struct Progress {
    #[cfg(feature = "progress")]
    bar: indicatif::ProgressBar,
}

impl Progress {
    /// A bar of `total` steps labelled `what`.
    pub fn new(total: u64, what: &str) -> Self {
        #[cfg(feature = "progress")]
        {
            let bar = indicatif::ProgressBar::with_draw_target(
                Some(total),
                indicatif::ProgressDrawTarget::stderr(),
            );
            if let Ok(s) = indicatif::ProgressStyle::with_template(
                "{msg:>14} [{bar:36}] {pos}/{len} {elapsed_precise} eta {eta} {prefix}",
            ) {
                bar.set_style(s.progress_chars("=> "));
            }
            bar.set_message(what.to_string());
            Self { bar }
        }
        #[cfg(not(feature = "progress"))]
        {
            let _ = (total, what);
            Self {}
        }
    }

    /// A handle that never draws (quiet runs, tests).
    pub fn hidden() -> Self {
        #[cfg(feature = "progress")]
        {
            Self {
                bar: indicatif::ProgressBar::hidden(),
            }
        }
        #[cfg(not(feature = "progress"))]
        Self {}
    }

    /// [`Progress::new`] unless `quiet`.
    pub fn maybe(quiet: bool, total: u64, what: &str) -> Self {
        if quiet {
            Self::hidden()
        } else {
            Self::new(total, what)
        }
    }

    pub fn inc(&self, n: u64) {
        #[cfg(feature = "progress")]
        self.bar.inc(n);
        #[cfg(not(feature = "progress"))]
        let _ = n;
    }

    pub fn set_position(&self, n: u64) {
        #[cfg(feature = "progress")]
        self.bar.set_position(n);
        #[cfg(not(feature = "progress"))]
        let _ = n;
    }

    pub fn set_length(&self, n: u64) {
        #[cfg(feature = "progress")]
        self.bar.set_length(n);
        #[cfg(not(feature = "progress"))]
        let _ = n;
    }

    /// Text after the counters (a running metric, say).
    pub fn set_note(&self, note: impl Into<String>) {
        #[cfg(feature = "progress")]
        self.bar.set_prefix(note.into());
        #[cfg(not(feature = "progress"))]
        let _ = note.into();
    }

    /// Prints a line above the bar (or to stderr when no bar is drawn).
    pub fn println(&self, line: impl AsRef<str>) {
        #[cfg(feature = "progress")]
        {
            if self.bar.is_hidden() {
                eprintln!("{}", line.as_ref());
            } else {
                self.bar.println(line.as_ref());
            }
        }
        #[cfg(not(feature = "progress"))]
        eprintln!("{}", line.as_ref());
    }

    pub fn finish(&self) {
        #[cfg(feature = "progress")]
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn hidden_progress_accepts_every_call() {
        let p = super::Progress::hidden();
        p.set_length(3);
        p.inc(2);
        p.set_position(3);
        p.set_note("x");
        p.finish();
    }
}
