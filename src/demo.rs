//! A throwaway demo VM for running on embedded defaults.
//!
//! Where QEMU is installed (`apt-get install qemu-system-x86`), `porthole
//! serve` starts a tiny VM with no disk on loopback: SeaBIOS on a VGA screen
//! (VNC) and on a serial console (a TCP chardev), retrying its boot every few
//! seconds so there is always something to see. It goes through the same
//! token and session path as any production console; only its ports are
//! chosen here. It is killed when Porthole stops.

use std::net::TcpListener;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use tokio::process::{Child, Command};

/// The QEMU binary the demo uses.
pub const QEMU: &str = "qemu-system-x86_64";

/// A running demo VM.
#[derive(Debug)]
pub struct DemoVm {
    child: Child,
    /// Its VNC port on 127.0.0.1.
    pub vnc_port: u16,
    /// Its serial console port on 127.0.0.1.
    pub serial_port: u16,
    /// Its SPICE port on 127.0.0.1 (ticket from the state folder), if it has one.
    pub spice_port: Option<u16>,
}

/// Whether QEMU is on the PATH.
pub fn qemu_available() -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(QEMU).is_file()))
}

/// A loopback port in `range` that is free right now.
fn free_port(range: std::ops::Range<u16>) -> Option<u16> {
    range
        .into_iter()
        .find(|p| TcpListener::bind(("127.0.0.1", *p)).is_ok())
}

impl DemoVm {
    /// Starts the VM; files it needs go in `state_dir`. With `spice_password`
    /// (a file) it also gets a SPICE server that expects that ticket, which
    /// Porthole holds and browsers and native clients never see.
    pub async fn start(state_dir: &Path, spice_password: Option<&Path>) -> anyhow::Result<DemoVm> {
        // QEMU numbers VNC displays from port 5900.
        let vnc_port = free_port(5900..6000).context("no free VNC port in 5900-5999")?;
        let serial_port = free_port(14000..15000).context("no free serial port")?;
        // SeaBIOS writes to (and reads keys from) the serial port named by this fw_cfg file.
        let spice_port = match spice_password {
            Some(_) => Some(free_port(15000..16000).context("no free SPICE port")?),
            None => None,
        };
        let sercon = state_dir.join("demo-sercon-port.bin");
        std::fs::write(&sercon, 0x3f8u16.to_le_bytes()).context("demo VM files")?;
        let child = Command::new(QEMU)
            .args([
                "-name",
                "porthole-demo",
                "-machine",
                "pc,accel=tcg",
                "-cpu",
                "qemu64",
            ])
            .args([
                "-smp",
                "1",
                "-m",
                "64",
                "-nodefaults",
                "-no-user-config",
                "-nic",
                "none",
            ])
            .args(["-vga", "std", "-display", "none"])
            .arg("-vnc")
            .arg(format!("127.0.0.1:{},share=force-shared", vnc_port - 5900))
            .arg("-serial")
            .arg(format!("tcp:127.0.0.1:{serial_port},server=on,wait=off"))
            .arg("-fw_cfg")
            .arg(format!("name=etc/sercon-port,file={}", sercon.display()))
            .args(["-boot", "menu=on,splash-time=3000,reboot-timeout=8000"])
            .args(match (spice_port, spice_password) {
                (Some(port), Some(pw)) => vec![
                    "-object".to_string(),
                    format!("secret,id=spicepw,file={}", pw.display()),
                    "-spice".to_string(),
                    format!("addr=127.0.0.1,port={port},password-secret=spicepw"),
                ],
                _ => Vec::new(),
            })
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {QEMU}"))?;
        let vm = DemoVm {
            child,
            vnc_port,
            serial_port,
            spice_port,
        };
        // Every wait has a deadline: the VM's ports answer within a second or two.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let vnc = tokio::net::TcpStream::connect(("127.0.0.1", vnc_port)).await;
            if vnc.is_ok() {
                return Ok(vm);
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("the demo VM did not open its VNC port within 15 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the VM.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}
