//! Progress of a long job on a terminal or in a log.

/// Progress of a long job: on a terminal, a bar with the rate and ETA; in logs (stderr is not a
/// terminal), a plain line every few seconds and at the end.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    label: String,
    unit: &'static str,
    total: u64,
    done: u64,
    /// Done when this run started (a resumed run's earlier work does not count in the rate).
    first: u64,
    start: std::time::Instant,
    last_line: std::time::Instant,
}

impl Progress {
    /// How often a plain progress line is written to a log.
    pub const LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

    pub fn new(label: &str, unit: &'static str, total: u64, done: u64) -> Self {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(&format!(
                    "{{prefix}} {{wide_bar}} {{pos}}/{{len}} {unit} {{per_sec}} ETA {{eta}}"
                ))
                .expect("a valid template"),
            );
            bar.set_prefix(label.to_string());
            bar.set_position(done);
            bar.reset_eta();
            bar
        });
        let now = std::time::Instant::now();
        Self {
            bar,
            label: label.to_string(),
            unit,
            total,
            done,
            first: done,
            start: now,
            last_line: now,
        }
    }

    /// Items per second in this run so far.
    pub fn rate(&self) -> f64 {
        (self.done - self.first) as f64 / self.start.elapsed().as_secs_f64().max(1e-9)
    }

    pub fn inc(&mut self, n: u64) {
        self.done += n;
        match &self.bar {
            Some(bar) => bar.inc(n),
            None if self.last_line.elapsed() >= Self::LOG_EVERY => {
                self.last_line = std::time::Instant::now();
                eprintln!("{}", self.line());
            }
            None => {}
        }
    }

    /// Prints a message without breaking the bar.
    pub fn println(&self, msg: impl AsRef<str>) {
        match &self.bar {
            Some(bar) => bar.println(msg.as_ref()),
            None => eprintln!("{}", msg.as_ref()),
        }
    }

    fn line(&self) -> String {
        let rate = self.rate();
        let left = self.total.saturating_sub(self.done) as f64;
        let eta = if rate > 0.0 {
            format!("{:.0}s", left / rate)
        } else {
            "?".into()
        };
        format!(
            "{}: {}/{} {} ({:.1}%), {:.1} {}/s, ETA {eta}",
            self.label,
            self.done,
            self.total,
            self.unit,
            100.0 * self.done as f64 / self.total.max(1) as f64,
            rate,
            self.unit
        )
    }

    /// Clears the bar, or writes the last plain line.
    pub fn finish(&self) {
        match &self.bar {
            Some(bar) => bar.finish_and_clear(),
            None => eprintln!("{}", self.line()),
        }
    }
}
