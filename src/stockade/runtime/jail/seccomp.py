"""The syscall filter every sandboxed process runs under, compiled with libseccomp.

Default allow, with the syscalls a sandbox has no business making answering EPERM: mounting, changing
root, tracing or reading other processes, loading kernel code, BPF, perf, keyrings, userfaultfd,
io_uring, namespace creation or entry, NUMA memory policy, the LDT, obsolete and unimplemented calls,
and sockets outside AF_UNIX/AF_INET/AF_INET6. The set is a superset of what Docker's default profile
(moby/profiles seccomp/default.json) refuses a container without capabilities; docs/architecture.md lists
each difference. ``clone3`` answers ENOSYS (its flags sit behind a pointer a filter cannot read), so libc
falls back to ``clone``, whose flags are checked. Syscall numbers above the newest one reviewed here
answer ENOSYS, so a newer kernel's new calls stay closed until someone reviews them. Syscalls made
through another ABI (32-bit int 0x80, x32) kill the process: libseccomp filters the native architecture
only and its bad-arch action is KILL.
"""

from __future__ import annotations

import errno
import tempfile
from functools import cache
from pathlib import Path

from ...errors import SandboxUnavailableError

DENIED = (
    # mount family and root changes
    "mount", "umount2", "pivot_root", "chroot", "fsopen", "fsconfig", "fsmount", "fspick",
    "move_mount", "open_tree", "mount_setattr",
    # other processes' memory
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    # kernel code and state
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "bpf",
    "perf_event_open", "lookup_dcookie", "syslog", "acct", "swapon", "swapoff", "reboot", "quotactl",
    "quotactl_fd", "iopl", "ioperm", "uselib", "nfsservctl", "vhangup",
    # keyrings
    "keyctl", "add_key", "request_key",
    # attack surface with a history of exploits
    "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register", "open_by_handle_at",
    "name_to_handle_at", "fanotify_init",
    # namespaces
    "unshare", "setns",
    # clock and time
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
    # NUMA placement and other processes' pages (Docker: CAP_SYS_NICE / CAP_SYS_PTRACE only)
    "mbind", "set_mempolicy", "get_mempolicy", "set_mempolicy_home_node", "migrate_pages", "move_pages",
    "process_madvise",
    # the local descriptor table: 16-bit segments, a source of kernel bugs (espfix, CVE-2015-5157)
    "modify_ldt",
    # host identity (the UTS namespace already isolates them) and obsolete or unimplemented calls
    "sethostname", "setdomainname", "_sysctl", "sysfs", "ustat", "create_module", "get_kernel_syms",
    "query_module", "afs_syscall", "getpmsg", "putpmsg", "security", "tuxcall", "vserver",
)
# Syscalls newer than libseccomp 2.5's table, by number (from 424 on every architecture shares the
# numbers). Those not listed (statmount, listmount, mseal, the *xattrat family) are allowed, as Docker does.
DENIED_BY_NUMBER = {459: "lsm_get_self_attr", 460: "lsm_set_self_attr", 461: "lsm_list_modules",
                    467: "open_tree_attr"}
NEWEST_REVIEWED = 467        # open_tree_attr (6.15); file_getattr/setattr (6.17, 468-469) and later: ENOSYS
NATIVE_TABLE_END = 512       # x86_64 keeps its native numbers below the x32 range (512 and up)
NAMESPACE_FLAGS = {
    "CLONE_NEWNS": 0x00020000, "CLONE_NEWCGROUP": 0x02000000, "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000, "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}
# A command's processes must stay below its top process, a child subreaper the agent makes at spawn, so a
# timeout or kill finds all of them: a child of CLONE_PARENT would be the top's sibling (the agent's child),
# and clearing the subreaper flag would send orphans to the agent.
CLONE_PARENT = 0x00008000
PR_SET_CHILD_SUBREAPER = 36
ALLOWED_SOCKET_FAMILIES = (1, 2, 10)  # AF_UNIX, AF_INET, AF_INET6
TIOCSTI, TIOCLINUX = 0x5412, 0x541C   # push input into the terminal: a known escape from a session
TIOCSETD = 0x5423                     # change a terminal's line discipline (n_gsm, n_hdlc: kernel CVEs)


@cache
def filter_bpf() -> bytes:
    """The compiled BPF program (what bwrap --seccomp loads), from the trusted on-disk cache when it holds
    this exact rule table's program for this libseccomp (seccomp_cache.py), else compiled now."""
    from .seccomp_cache import cached, default_directory

    return cached(compile_bpf, Path(__file__), default_directory())


def compile_bpf() -> bytes:
    """The program compiled by libseccomp from the rules above."""
    try:
        import pyseccomp as sc
    except (ImportError, OSError, AttributeError, TypeError) as exc:  # binding or libseccomp.so.2 missing
        raise SandboxUnavailableError(
            f"seccomp is unavailable: cannot load libseccomp ({exc})",
            "fix: apt-get install libseccomp2 (any current Debian/Ubuntu has it); "
            "pip install pyseccomp") from None
    eperm = sc.ERRNO(errno.EPERM)
    f = sc.SyscallFilter(sc.ALLOW)
    f.set_attr(sc.Attr.CTL_OPTIMIZE, 2)  # a binary tree over syscall numbers: O(log n) per syscall
    for name in DENIED:
        try:
            f.add_rule(eperm, name)
        except (OSError, ValueError):  # unknown on this architecture or libseccomp version
            continue
    for nr in DENIED_BY_NUMBER:
        f.add_rule(eperm, nr)
    enosys = sc.ERRNO(errno.ENOSYS)
    for nr in range(NEWEST_REVIEWED + 1, NATIVE_TABLE_END):
        f.add_rule(enosys, nr)
    f.add_rule(enosys, "clone3")
    for flag in (*NAMESPACE_FLAGS.values(), CLONE_PARENT):
        f.add_rule(eperm, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    f.add_rule(eperm, "prctl", sc.Arg(0, sc.EQ, PR_SET_CHILD_SUBREAPER), sc.Arg(1, sc.EQ, 0))
    # other socket families answer as a kernel without them does (EAFNOSUPPORT), which tools take as "not
    # here" and go on: useradd and adduser (so apt's postinst scripts in a build step) abort on EPERM from
    # their audit netlink socket
    no_family = sc.ERRNO(errno.EAFNOSUPPORT)
    for family in range(0, max(ALLOWED_SOCKET_FAMILIES)):
        if family not in ALLOWED_SOCKET_FAMILIES:
            f.add_rule(no_family, "socket", sc.Arg(0, sc.EQ, family))
            f.add_rule(no_family, "socketpair", sc.Arg(0, sc.EQ, family))
    f.add_rule(no_family, "socket", sc.Arg(0, sc.GT, max(ALLOWED_SOCKET_FAMILIES)))
    f.add_rule(no_family, "socketpair", sc.Arg(0, sc.GT, max(ALLOWED_SOCKET_FAMILIES)))
    for request in (TIOCSTI, TIOCLINUX, TIOCSETD):
        f.add_rule(eperm, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, request))
    # personality(0xffffffff) only queries; every change (e.g. ADDR_NO_RANDOMIZE) is refused.
    f.add_rule(eperm, "personality", sc.Arg(0, sc.NE, 0xFFFFFFFF))
    return _export(f)


def _export(f: object) -> bytes:
    with tempfile.TemporaryFile() as out:  # libseccomp writes to the descriptor directly
        f.export_bpf(out)  # type: ignore[attr-defined]
        out.seek(0)
        return out.read()


SECCOMP_SYSCALL = {"x86_64": 317, "aarch64": 277}  # the number that loads a filter, where it is known


@cache
def sysinfo_notifier() -> tuple[bytes, int]:
    """The filter the agent stacks over this one so that it answers sysinfo() itself (agent/sysinfo.py:
    the host kernel would give the host's RAM, swap and thread count), with the number of the seccomp
    syscall that loads it. Everything but sysinfo is allowed: the main filter decides those. Cached on
    disk like the main filter (a one-shot run would otherwise load libseccomp for it)."""
    import platform

    from .seccomp_cache import cached, default_directory

    nr = SECCOMP_SYSCALL.get(platform.machine())
    if nr is None:
        import pyseccomp as sc

        nr = sc.resolve_syscall(sc.Arch.NATIVE, "seccomp")
    return cached(_compile_sysinfo_notifier, Path(__file__), default_directory(), "sysinfo"), nr


def _compile_sysinfo_notifier() -> bytes:
    import pyseccomp as sc

    f = sc.SyscallFilter(sc.ALLOW)
    f.add_rule(sc.NOTIFY, "sysinfo")
    return _export(f)


def oci_profile() -> dict[str, object]:
    """The same rules as an OCI seccomp profile (config.json's linux.seccomp), for a runtime that applies
    the profile itself: runsc --oci-seccomp runs it in gVisor's Sentry, over every task of the sandbox. The
    by-number rules are left out: the Sentry implements none of those calls (they answer ENOSYS there). So
    is clone3: runsc answers every refusal with EPERM (it ignores errnoRet), and glibc falls back to clone
    only on ENOSYS, so refusing it would break thread creation; the Sentry's clone3 makes no host
    namespace, and the clone rules below still refuse namespace flags."""
    def rule(names: list[str], *args: dict[str, object]) -> dict[str, object]:
        return {"names": names, "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM, "args": list(args)}

    def arg(index: int, op: str, value: int, value_two: int = 0) -> dict[str, object]:
        return {"index": index, "value": value, "valueTwo": value_two, "op": op}

    rules = [rule(list(DENIED))]
    rules += [rule(["clone"], arg(0, "SCMP_CMP_MASKED_EQ", flag, flag))
              for flag in (*NAMESPACE_FLAGS.values(), CLONE_PARENT)]
    rules.append(rule(["prctl"], arg(0, "SCMP_CMP_EQ", PR_SET_CHILD_SUBREAPER), arg(1, "SCMP_CMP_EQ", 0)))
    for family in range(0, max(ALLOWED_SOCKET_FAMILIES)):
        if family not in ALLOWED_SOCKET_FAMILIES:
            rules.append(rule(["socket", "socketpair"], arg(0, "SCMP_CMP_EQ", family)))
    rules.append(rule(["socket", "socketpair"], arg(0, "SCMP_CMP_GT", max(ALLOWED_SOCKET_FAMILIES))))
    rules += [rule(["ioctl"], arg(1, "SCMP_CMP_MASKED_EQ", 0xFFFFFFFF, request))
              for request in (TIOCSTI, TIOCLINUX, TIOCSETD)]
    rules.append(rule(["personality"], arg(0, "SCMP_CMP_NE", 0xFFFFFFFF)))
    return {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"], "syscalls": rules}
