//! The `vsva` command: the end-to-end demo, scripted scenarios, walk explanations,
//! measurements, and the host as a service.

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use vsva_testbed::bench::cli::{run_cli, BenchArgs};
use vsva_testbed::demo::{self, DemoIommu, DemoOptions, DemoSummary};
use vsva_testbed::scenario::{self, Scenario};
use vsva_testbed::smmu_demo;
use vsva_testbed::stack::Uapi;

#[derive(Parser)]
#[command(
    name = "vsva",
    version,
    about = "Shared virtual addressing for virtual machines"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The uAPIs of `vsva demo --uapi`.
#[derive(Clone, Copy, ValueEnum)]
enum UapiArg {
    /// The seed's VFIO type1 nesting container.
    Type1,
    /// iommufd (`/dev/iommu` and the device's VFIO cdev).
    Iommufd,
}

impl From<UapiArg> for Uapi {
    fn from(u: UapiArg) -> Uapi {
        match u {
            UapiArg::Type1 => Uapi::Type1,
            UapiArg::Iommufd => Uapi::Iommufd,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// One host, several VMs, processes sharing their address spaces with passthrough DMA
    /// engines; every byte checked.
    Demo {
        /// Seed of the data and of the byte the compare step changes.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Number of VMs.
        #[arg(long, default_value_t = 2)]
        vms: usize,
        /// Processes per VM.
        #[arg(long, default_value_t = 3)]
        processes: usize,
        /// Bytes per DMA buffer.
        #[arg(long, default_value_t = 256 << 10)]
        bytes: u64,
        /// Print each summary as one JSON object (one line per uAPI) instead of text.
        #[arg(long)]
        json: bool,
        /// Run one `vsva host` process and one `vsva vm` process per VM (VM i with seed
        /// seed + i) instead of everything in this process.
        #[arg(long)]
        split: bool,
        /// The uAPI the VMMs reach the host through; without it the demo runs over each,
        /// type1 first, and prints a summary for each.
        #[arg(long, value_enum)]
        uapi: Option<UapiArg>,
        /// The host IOMMU: VT-d with x86-64 guests, or SMMUv3 with arm64 guests (over the
        /// type1 container, or over iommufd with `--uapi iommufd`; with --split and no
        /// --uapi, over each). Without it, both run, each ending with its summary line
        /// (SMMUv3 only where the uAPI is type1 and, with --split, only when asked for).
        #[arg(long, value_enum)]
        iommu: Option<IommuArch>,
    },
    /// A scripted run that shows one behaviour of the stack.
    Run {
        #[arg(value_enum)]
        scenario: Scenario,
        /// The host IOMMU: VT-d (the default), or SMMUv3 (`migrate-dirty` only: dirty
        /// tracking over a stage-1 domain with hardware dirty-state updates).
        #[arg(long, value_enum)]
        iommu: Option<IommuArch>,
    },
    /// Prints the nested walk of one request, step by step, on the demo's state.
    Explain {
        /// The VM (0-based).
        #[arg(long, default_value_t = 0)]
        vm: usize,
        /// The PASID (as the demo bound it; default: the VM's first).
        #[arg(long)]
        pasid: Option<u32>,
        /// The guest virtual address (default: the first byte of the process's buffer).
        #[arg(long, value_parser = parse_u64)]
        addr: Option<u64>,
        /// The host IOMMU: VT-d (the default), or SMMUv3: the physical SMMU's walk of the
        /// VM's device with a SubstreamID (`--pasid`): STE, CD, each stage-1 step with
        /// its stage-2 walk.
        #[arg(long, value_enum)]
        iommu: Option<IommuArch>,
    },
    /// Measures the hot paths against baselines in the same run.
    Bench(BenchArgs),
    /// Serves the host (memory, the IOMMU model and its driver, PASIDs) to VMM processes
    /// over a UNIX socket until SIGTERM or SIGINT (docs/protocol.md).
    Host {
        /// The host IOMMU: VT-d (VFIO containers and iommufd), or SMMUv3 with its
        /// interrupt thread (VFIO type1 containers with VFIO_IOMMU_ATTACH_PASID_TABLE, and
        /// iommufd with vIOMMU, vDEVICE, nested HWPTs and vEVENT queues).
        #[arg(long, value_enum, default_value = "vtd")]
        iommu: IommuArch,
        /// The socket to create (mode 0600).
        #[arg(long)]
        socket: std::path::PathBuf,
        /// Host memory (sparse): bytes, or with a K, M or G suffix.
        #[arg(long, default_value = "4G", value_parser = parse_size)]
        memory: u64,
        /// Connections served at once (one more is refused with EUSERS).
        #[arg(long, default_value_t = vsva_service::server::Limits::default().max_connections)]
        max_connections: u32,
        /// Connections one client process may hold at once (one more: EUSERS).
        #[arg(long, default_value_t = vsva_service::server::Limits::default().max_connections_per_process)]
        max_connections_per_process: u32,
        /// PASIDs one connection's container may hold (one more: ENOSPC).
        #[arg(long, default_value_t = vsva_service::server::Limits::default().pasid_quota)]
        pasid_quota: u32,
        /// The IOMMU model in strict mode: a cached translation used after the tables
        /// changed without its invalidation is a violation, counted in STATE and listed
        /// at exit (exit 1 if any).
        #[arg(long)]
        strict: bool,
    },
    /// One VMM (vIOMMU, the host's passthrough device, the guest and the demo's workload
    /// for one VM) against a running `vsva host`; exits non-zero on any failed check or
    /// when the host goes away.
    Vm {
        /// The host's socket.
        #[arg(long)]
        socket: std::path::PathBuf,
        /// Seed of the data and of the byte the compare step changes.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Guest processes.
        #[arg(long, default_value_t = 3)]
        processes: usize,
        /// Bytes per DMA buffer.
        #[arg(long, default_value_t = 256 << 10)]
        bytes: u64,
        /// The VM's index (names it in the output).
        #[arg(long, default_value_t = 0)]
        index: usize,
        /// Print the VM's report as one JSON object on the last line.
        #[arg(long)]
        json: bool,
        /// Test hook: announce a stage on stdout and wait there for a line on stdin.
        #[arg(long, value_enum, hide = true)]
        pause_at: Option<vsva_testbed::remote::Stage>,
        /// After the workload, take part in `vsva demo --split`'s cross-VM checks: list
        /// the processes on stdout and follow the commands read from stdin.
        #[arg(long, hide = true)]
        cross_vm: bool,
        /// The uAPI the VMM reaches the host through: a VFIO type1 container, or
        /// `/dev/iommu` with the device's cdev.
        #[arg(long, value_enum, default_value = "type1")]
        uapi: UapiArg,
        /// The host's IOMMU: VT-d (an x86-64 guest with a virtual VT-d), or SMMUv3 (an
        /// arm64 guest with a virtual SMMUv3, against `vsva host --iommu smmuv3`).
        #[arg(long, value_enum, default_value = "vtd")]
        iommu: IommuArch,
    },
    /// Starts a host and N VM processes that loop bind → DMA → verify → invalidate →
    /// unbind with random sizes, optionally killing random VMs; reports throughput, the
    /// cross-process latencies, bytes verified, kills and errors (which must be 0).
    Load {
        /// VM processes at once.
        #[arg(long, default_value_t = 2)]
        vms: usize,
        /// Seconds of load.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Chaos: SIGKILL a random VM process about every MS milliseconds (at a random
        /// point of its loop) and start a new one.
        #[arg(long, value_name = "MS")]
        kill_every: Option<u64>,
        /// Seed of the sizes, the data and the kills.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Largest DMA buffer, in 4 KiB pages.
        #[arg(long, default_value_t = 16)]
        max_pages: u64,
        /// Print the report as one JSON object on the last line.
        #[arg(long)]
        json: bool,
        /// The host's IOMMU: VT-d (x86-64 VMs with a virtual VT-d), or SMMUv3 (arm64 VMs
        /// with a virtual SMMUv3 whose CD tables the host's STEs point at).
        #[arg(long, value_enum, default_value = "vtd")]
        iommu: IommuArch,
    },
    /// One VM process of `vsva load` (started by it).
    #[command(hide = true)]
    LoadWorker {
        #[arg(long)]
        socket: std::path::PathBuf,
        #[arg(long)]
        seed: u64,
        #[arg(long)]
        millis: u64,
        #[arg(long)]
        max_pages: u64,
        #[arg(long, value_enum, default_value = "vtd")]
        iommu: IommuArch,
    },
}

fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, shift) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 30),
        _ => (t, 0),
    };
    let n = parse_u64(digits)?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s}: too large"))
}

fn parse_u64(s: &str) -> Result<u64, String> {
    let t = s.trim();
    match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16),
        None => t.replace('_', "").parse(),
    }
    .map_err(|e| format!("{s}: {e}"))
}

/// Shows the layers' logged warnings and errors on stderr; `RUST_LOG` chooses others.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::builder()
        .with_default_directive(tracing_subscriber::filter::LevelFilter::WARN.into())
        .from_env_lossy();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// The host IOMMU architecture of `vsva demo --iommu`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum IommuArch {
    /// Intel VT-d, x86-64 guests with a virtual VT-d.
    Vtd,
    /// Arm SMMUv3, arm64 guests with a virtual SMMUv3.
    Smmuv3,
}

impl From<IommuArch> for vsva_service::server::IommuArch {
    fn from(a: IommuArch) -> Self {
        match a {
            IommuArch::Vtd => vsva_service::server::IommuArch::Vtd,
            IommuArch::Smmuv3 => vsva_service::server::IommuArch::Smmuv3,
        }
    }
}

/// Prints a demo's summary (text or JSON); whether it had no error.
fn print_summary(summary: &DemoSummary, json: bool) -> bool {
    if json {
        println!(
            "{}",
            serde_json::to_string(summary).expect("a serialisable summary")
        );
    } else {
        println!("{summary}");
        println!("{}", summary.timing());
    }
    summary.errors == 0
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Command::Demo {
            seed,
            vms,
            processes,
            bytes,
            json,
            split,
            uapi,
            iommu,
        } => {
            let smmu_uapi = matches!(uapi, None | Some(UapiArg::Type1));
            let uapis = match uapi {
                Some(u) => vec![u.into()],
                None => vec![Uapi::Type1, Uapi::Iommufd],
            };
            let vtd_uapis = if iommu == Some(IommuArch::Smmuv3) {
                Vec::new()
            } else {
                uapis
            };
            let smmu = match iommu {
                Some(IommuArch::Smmuv3) => true,
                Some(IommuArch::Vtd) => false,
                None => smmu_uapi && !split,
            };
            // `--iommu smmuv3 --uapi U` runs it over U; `--iommu smmuv3 --split` alone over
            // each, type1 first, as VT-d's; otherwise over type1.
            let smmu_uapis = match (smmu, iommu, uapi) {
                (false, _, _) => Vec::new(),
                (true, Some(IommuArch::Smmuv3), Some(u)) => vec![Uapi::from(u)],
                (true, Some(IommuArch::Smmuv3), None) if split => {
                    vec![Uapi::Type1, Uapi::Iommufd]
                }
                (true, _, _) => vec![Uapi::Type1],
            };
            let runs = vtd_uapis
                .into_iter()
                .map(|u| (DemoIommu::Vtd, u))
                .chain(smmu_uapis.into_iter().map(|u| (DemoIommu::Smmuv3, u)));
            let mut code = ExitCode::SUCCESS;
            for (arch, uapi) in runs {
                let opts = DemoOptions {
                    seed,
                    vms,
                    processes,
                    bytes,
                    progress: !json,
                    uapi,
                    ..DemoOptions::default()
                };
                let mut log = |line: String| {
                    if !json {
                        println!("{line}");
                    }
                };
                let summary = if split {
                    std::env::current_exe()
                        .map_err(|e| e.to_string())
                        .and_then(|exe| {
                            vsva_testbed::remote::split_demo(&exe, &opts, arch, &mut log)
                                .map_err(|e| e.to_string())
                        })
                } else {
                    match arch {
                        DemoIommu::Vtd => demo::run(&opts, &mut log),
                        DemoIommu::Smmuv3 => smmu_demo::run(&opts, &mut log),
                    }
                    .map_err(|e| e.to_string())
                };
                match summary {
                    Ok(summary) => {
                        if !print_summary(&summary, json) {
                            code = ExitCode::FAILURE;
                        }
                    }
                    Err(e) => {
                        eprintln!("demo: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            code
        }
        Command::Run { scenario, iommu } => match match iommu {
            Some(IommuArch::Smmuv3) => scenario::run_smmuv3(scenario),
            _ => scenario::run(scenario),
        } {
            Ok(outcome) => {
                print!("{}", outcome.text);
                for f in &outcome.failed {
                    eprintln!("vsva: check failed: {f}");
                }
                if outcome.passed() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("vsva: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Explain {
            vm,
            pasid,
            addr,
            iommu: Some(IommuArch::Smmuv3),
        } => match smmu_demo::explain(vm, pasid, addr) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("explain: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Explain {
            vm, pasid, addr, ..
        } => report(scenario::explain(vm, pasid, addr)),
        Command::Host {
            iommu,
            socket,
            memory,
            max_connections,
            max_connections_per_process,
            pasid_quota,
            strict,
        } => {
            let config = vsva_service::server::HostConfig {
                iommu: iommu.into(),
                memory,
                strict,
                limits: vsva_service::server::Limits {
                    max_connections,
                    max_connections_per_process,
                    pasid_quota,
                    ..Default::default()
                },
            };
            match vsva_service::server::run(&socket, &config) {
                Ok(report) => {
                    println!("{report}");
                    if report.clean() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("vsva host: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Vm {
            socket,
            seed,
            processes,
            bytes,
            index,
            json,
            pause_at,
            cross_vm,
            uapi,
            iommu,
        } => {
            let opts = vsva_testbed::remote::VmOptions {
                index,
                demo: DemoOptions {
                    seed,
                    vms: 1,
                    processes,
                    bytes,
                    progress: false,
                    ..DemoOptions::default()
                },
                pause_at,
                cross_vm,
                uapi: uapi.into(),
            };
            let ran = match iommu {
                IommuArch::Vtd => {
                    vsva_testbed::remote::run(&socket, &opts, &mut |line| println!("{line}"))
                }
                IommuArch::Smmuv3 => {
                    smmu_demo::run_vm(&socket, &opts, &mut |line| println!("{line}"))
                }
            };
            match ran {
                Ok(report) => {
                    if json {
                        println!(
                            "{}",
                            serde_json::to_string(&report).expect("a serialisable report")
                        );
                    }
                    if report.error_count() == 0 {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("vsva vm: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Load {
            vms,
            seconds,
            kill_every,
            seed,
            max_pages,
            json,
            iommu,
        } => {
            if vms == 0 || !(seconds > 0.0 && seconds <= 86_400.0) || max_pages == 0 {
                eprintln!("vsva load: --vms, --seconds and --max-pages must be positive");
                return ExitCode::FAILURE;
            }
            let opts = vsva_service::load::LoadOptions {
                vms,
                duration: std::time::Duration::from_secs_f64(seconds),
                kill_every: kill_every.map(std::time::Duration::from_millis),
                seed,
                max_pages: max_pages.min(256),
                iommu: iommu.into(),
            };
            let exe = match std::env::current_exe() {
                Ok(e) => e,
                Err(e) => {
                    eprintln!("vsva load: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match vsva_service::load::run(&exe, &opts) {
                Ok(report) => {
                    for m in &report.messages {
                        eprintln!("vsva load: {m}");
                    }
                    if json {
                        println!(
                            "{}",
                            serde_json::to_string(&report).expect("a serialisable report")
                        );
                    } else {
                        println!("{report}");
                    }
                    if report.errors == 0 {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("vsva load: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::LoadWorker {
            socket,
            seed,
            millis,
            max_pages,
            iommu,
        } => {
            let worker = match iommu {
                IommuArch::Vtd => vsva_testbed::remote::load_worker,
                IommuArch::Smmuv3 => smmu_demo::load_worker,
            };
            let code = worker(
                &socket,
                seed,
                std::time::Duration::from_millis(millis),
                max_pages,
            );
            ExitCode::from(code as u8)
        }
        Command::Bench(args) => match run_cli(&args) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bench: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn report(result: Result<String, vsva_testbed::stack::StackError>) -> ExitCode {
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vsva: {e}");
            ExitCode::FAILURE
        }
    }
}
