//! Ctrl-C and SIGTERM handling for the demo: the signal only sets a flag, and every wait checks
//! it, so the demo returns an error and its guards clean up as on any other failure.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use driftwatch_e2e::DeviationWatcher;
use driftwatch_proto::v1::Deviation;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// How long one wait runs before it checks the flag again.
const SLICE: Duration = Duration::from_millis(200);

extern "C" fn on_signal(_signal: libc::c_int) {
    // Only an atomic store: anything more is not async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Installs the handler for SIGINT and SIGTERM.
pub fn install() -> anyhow::Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        let previous = unsafe {
            libc::signal(
                signal,
                on_signal as extern "C" fn(libc::c_int) as *const () as libc::sighandler_t,
            )
        };
        if previous == libc::SIG_ERR {
            bail!(
                "failed to install a handler for signal {signal}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// Fails with "interrupted" once Ctrl-C was pressed.
pub fn check() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Blocks until Ctrl-C or SIGTERM.
pub fn wait() {
    while !INTERRUPTED.load(Ordering::SeqCst) {
        std::thread::sleep(SLICE);
    }
}

/// Like [`driftwatch_e2e::wait_until`], but fails as soon as Ctrl-C is pressed.
pub fn wait_until<T>(
    timeout: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> anyhow::Result<Option<T>> {
    let deadline = Instant::now() + timeout;
    loop {
        check()?;
        let slice = SLICE.min(deadline.saturating_duration_since(Instant::now()));
        if let Some(value) = driftwatch_e2e::wait_until(slice, &mut probe) {
            return Ok(Some(value));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
    }
}

/// Waits for a deviation like [`DeviationWatcher::wait_for`], but fails as soon as Ctrl-C is pressed.
pub fn wait_for_deviation(
    watcher: &DeviationWatcher,
    expected: &str,
    timeout: Duration,
    accept: &dyn Fn(&Deviation) -> bool,
) -> anyhow::Result<Deviation> {
    let deadline = Instant::now() + timeout;
    loop {
        check()?;
        let slice = SLICE.min(deadline.saturating_duration_since(Instant::now()));
        match watcher.wait_for(expected, slice, accept) {
            Ok(found) => return Ok(found),
            // The last error lists everything received, which is what the user needs to see.
            Err(error) if Instant::now() >= deadline => return Err(error),
            Err(_) => {}
        }
    }
}
