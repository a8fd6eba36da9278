//! Progress bars for the commands that take a while (`convert`, `commit`, `rebase`,
//! `strata vm install`), on standard error. A bar is for someone watching: it is drawn
//! only when standard error is a terminal (indicatif hides it otherwise), and never for
//! `--json`, so output that is redirected or read by a script stays free of it.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressFinish, ProgressState, ProgressStyle};
use strata::size::format_size;

/// Steps of a bar that shows a fraction: fine enough that a percentage is never
/// rounded into the next one but within a millionth of it.
#[cfg_attr(not(target_os = "macos"), allow(dead_code))]
const FRACTION_STEPS: u64 = 1_000_000;

/// Width of a fraction bar, in characters.
#[cfg_attr(not(target_os = "macos"), allow(dead_code))]
const FRACTION_WIDTH: usize = 40;

/// A progress bar on standard error. It stays as drawn last when it is finished or
/// dropped, also after a failure, and later output starts on the next line.
#[derive(Clone)]
pub(crate) struct Bar(ProgressBar);

impl Bar {
    /// A bar for a copy of bytes: `convert [######      ]  42% 1.2 GiB / 2.9 GiB`;
    /// hidden with `json`.
    pub(crate) fn bytes(label: &'static str, json: bool) -> Bar {
        let target = if json {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        let style = style("{prefix} [{bar:25}] {percent3}% {done} / {total}", "# ")
            .with_key("done", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{}", format_size(s.pos()));
            })
            .with_key("total", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{}", format_size(s.len().unwrap_or(0)));
            });
        Bar(ProgressBar::with_draw_target(Some(0), target)
            .with_style(style)
            .with_prefix(label)
            .with_finish(ProgressFinish::Abandon))
    }

    /// A bar for a fraction done: `[################........................]  42%`
    /// (the macOS installer's).
    #[cfg_attr(not(target_os = "macos"), allow(dead_code))]
    pub(crate) fn fraction() -> Bar {
        Bar::fraction_on(ProgressDrawTarget::stderr(), FRACTION_WIDTH)
    }

    #[cfg_attr(not(target_os = "macos"), allow(dead_code))]
    fn fraction_on(target: ProgressDrawTarget, width: usize) -> Bar {
        let style = style(&format!("[{{bar:{width}}}] {{percent3}}%"), "#.");
        Bar(ProgressBar::with_draw_target(Some(FRACTION_STEPS), target)
            .with_style(style)
            .with_finish(ProgressFinish::Abandon))
    }

    /// Shows `done` bytes of `total`.
    pub(crate) fn update(&self, done: u64, total: u64) {
        self.0.set_length(total);
        self.0.set_position(done);
    }

    /// Shows the fraction done; a fraction outside 0 to 1 shows as the nearer end, and
    /// one that is not finite as nothing done.
    #[cfg_attr(not(target_os = "macos"), allow(dead_code))]
    pub(crate) fn set_fraction(&self, fraction: f64) {
        self.0.set_position(steps(fraction));
    }

    /// Leaves the bar as it is; what is printed next starts on the next line.
    pub(crate) fn finish(&self) {
        self.0.abandon();
    }
}

/// `fraction` in [`FRACTION_STEPS`], clamped to 0 to 1; one that is not finite
/// counts as 0.
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss
)]
#[cfg_attr(not(target_os = "macos"), allow(dead_code))]
fn steps(fraction: f64) -> u64 {
    let fraction = if fraction.is_finite() {
        fraction.clamp(0.0, 1.0)
    } else {
        0.0
    };
    (fraction * FRACTION_STEPS as f64).round() as u64
}

/// A bar style from `template`, with `{percent3}`: the whole percentage done, right
/// aligned in three places, counted in integers (indicatif's own `{percent}` goes
/// through `f32` and can show 41% for 42%).
fn style(template: &str, chars: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .expect("the bar templates are valid")
        .progress_chars(chars)
        .with_key(
            "percent3",
            |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:3}", percent(s.pos(), s.len().unwrap_or(0)));
            },
        )
}

/// `done` of `total` in whole percent; an empty total is all done.
fn percent(done: u64, total: u64) -> u128 {
    (u128::from(done) * 100)
        .checked_div(u128::from(total))
        .unwrap_or(100)
        .min(100)
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use indicatif::TermLike;

    use super::*;

    /// A terminal that keeps the last line drawn.
    #[derive(Debug, Clone, Default)]
    struct Screen(Arc<Mutex<String>>);

    impl TermLike for Screen {
        fn width(&self) -> u16 {
            80
        }
        fn move_cursor_up(&self, _: usize) -> io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> io::Result<()> {
            self.write_str(s)
        }
        fn write_str(&self, s: &str) -> io::Result<()> {
            if !s.trim().is_empty() {
                *self.0.lock().unwrap() = s.trim_end().to_owned();
            }
            Ok(())
        }
        fn clear_line(&self) -> io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
    }

    fn drawn(fraction: f64, width: usize) -> String {
        let screen = Screen::default();
        let bar = Bar::fraction_on(
            ProgressDrawTarget::term_like(Box::new(screen.clone())),
            width,
        );
        bar.set_fraction(fraction);
        bar.0.force_draw();
        screen.0.lock().unwrap().clone()
    }

    #[test]
    fn progress_bars() {
        assert_eq!(drawn(0.0, 10), "[..........]   0%");
        assert_eq!(drawn(0.42, 10), "[####......]  42%");
        assert_eq!(drawn(1.0, 10), "[##########] 100%");
        assert_eq!(drawn(7.0, 4), "[####] 100%");
        assert_eq!(drawn(f64::NAN, 4), "[....]   0%");
    }

    #[test]
    fn byte_counts_in_whole_percent() {
        assert_eq!(percent(42, 100), 42);
        assert_eq!(percent(0, 0), 100);
        assert_eq!(percent(u64::MAX, u64::MAX), 100);
        assert_eq!(percent(7, 3), 100);
    }
}
