//! Seccomp: the restored tree gets exactly the new spec's filter, whatever
//! the images held. CRIU would install the checkpoint's own chain, which its
//! author chose; instead `seccomp.img` is rewritten to hold one filter, the
//! spec's `linux.seccomp` compiled here with libseccomp, and every thread is
//! set to it (or to none where the spec has none), so the restored init shows
//! the same `Seccomp` mode and `Seccomp_filters` count as a fresh container.
//!
//! The rules are compiled as runc compiles them: unknown syscall names are
//! skipped, a rule whose action is the default one is left out, and a rule
//! with two conditions on one argument becomes one rule per condition. The
//! program differs from runc's in one way: runc adds a stub that answers
//! ENOSYS for syscalls newer than the profile knows; here those get the
//! profile's default action, which is never less strict. A profile that
//! hands decisions to a user-space agent (SCMP_ACT_NOTIFY) cannot be
//! restored: the agent's socket is runc's to set up at start.

use libseccomp::{
    ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall,
};
use serde_json::Value;

use crate::error::{Error, Result};

/// The BPF program (an array of `struct sock_filter`) of `profile`.
pub fn compile(profile: &Value) -> Result<Vec<u8>> {
    let bad =
        |why: String| Error::InvalidArgument(format!("the new spec's seccomp profile: {why}"));
    let default = action(&profile["defaultAction"], &profile["defaultErrnoRet"])?;
    let mut ctx = ScmpFilterContext::new(default).map_err(|e| bad(e.to_string()))?;
    ctx.set_ctl_nnp(false).map_err(|e| bad(e.to_string()))?;
    for arch in profile["architectures"].as_array().into_iter().flatten() {
        let name = arch.as_str().unwrap_or_default();
        let arch: ScmpArch = name
            .parse()
            .map_err(|_| bad(format!("unknown architecture {name}")))?;
        ctx.add_arch(arch)
            .map_err(|e| bad(format!("{name}: {e}")))?;
    }
    for rule in profile["syscalls"].as_array().into_iter().flatten() {
        let act = action(&rule["action"], &rule["errnoRet"])?;
        if act == default {
            continue;
        }
        let conditions = conditions(&rule["args"]).map_err(bad)?;
        for name in rule["names"].as_array().into_iter().flatten() {
            let Ok(call) = ScmpSyscall::from_name(name.as_str().unwrap_or_default()) else {
                continue;
            };
            add(&mut ctx, act, call, &conditions).map_err(|e| bad(format!("{name}: {e}")))?;
        }
    }
    export(&ctx)
}

fn action(name: &Value, errno: &Value) -> Result<ScmpAction> {
    let name = name.as_str().unwrap_or_default();
    if name == "SCMP_ACT_NOTIFY" {
        return Err(Error::Unlike {
            process: "(every process)".into(),
            field: "seccomp",
            found: "a restore".into(),
            fresh: "a SCMP_ACT_NOTIFY profile, whose agent only a fresh start can reach".into(),
        });
    }
    // ERRNO without a value answers EPERM, as runc's default.
    let value = errno.as_i64().map(|v| v as i32).or(Some(libc::EPERM));
    ScmpAction::from_str(name, value).map_err(|_| {
        Error::InvalidArgument(format!(
            "the new spec's seccomp profile: unknown action {name:?}"
        ))
    })
}

/// Each condition with the argument it tests.
fn conditions(args: &Value) -> std::result::Result<Vec<(u32, ScmpArgCompare)>, String> {
    let mut out = Vec::new();
    for a in args.as_array().into_iter().flatten() {
        let index = a["index"]
            .as_u64()
            .filter(|i| *i < 6)
            .ok_or("an argument index past 5")?;
        let value = a["value"].as_u64().unwrap_or(0);
        let two = a["valueTwo"].as_u64().unwrap_or(0);
        let (op, datum) = match a["op"].as_str().unwrap_or_default() {
            "SCMP_CMP_NE" => (ScmpCompareOp::NotEqual, value),
            "SCMP_CMP_LT" => (ScmpCompareOp::Less, value),
            "SCMP_CMP_LE" => (ScmpCompareOp::LessOrEqual, value),
            "SCMP_CMP_EQ" => (ScmpCompareOp::Equal, value),
            "SCMP_CMP_GE" => (ScmpCompareOp::GreaterEqual, value),
            "SCMP_CMP_GT" => (ScmpCompareOp::Greater, value),
            "SCMP_CMP_MASKED_EQ" => (ScmpCompareOp::MaskedEqual(value), two),
            other => return Err(format!("unknown comparison {other:?}")),
        };
        out.push((index as u32, ScmpArgCompare::new(index as u32, op, datum)));
    }
    Ok(out)
}

/// One rule, or one per condition where two test the same argument
/// (libseccomp refuses that in one rule; runc reads them as alternatives).
fn add(
    ctx: &mut ScmpFilterContext,
    act: ScmpAction,
    call: ScmpSyscall,
    conditions: &[(u32, ScmpArgCompare)],
) -> std::result::Result<(), libseccomp::error::SeccompError> {
    let mut indexes: Vec<u32> = conditions.iter().map(|(i, _)| *i).collect();
    indexes.sort_unstable();
    let repeated = indexes.windows(2).any(|w| w[0] == w[1]);
    let all: Vec<ScmpArgCompare> = conditions.iter().map(|(_, c)| *c).collect();
    match (all.is_empty(), repeated) {
        (true, _) => ctx.add_rule(act, call).map(drop),
        (false, false) => ctx.add_rule_conditional(act, call, &all).map(drop),
        (false, true) => all
            .iter()
            .try_for_each(|c| ctx.add_rule_conditional(act, call, &[*c]).map(drop)),
    }
}

/// libseccomp 2.5 exports only to a file descriptor: a memfd here.
fn export(ctx: &ScmpFilterContext) -> Result<Vec<u8>> {
    use std::io::{Read, Seek};
    let mut f = crate::safefs::memfd(c"seccomp-bpf")?;
    ctx.export_bpf(&f)
        .map_err(|e| Error::Other(format!("export the seccomp filter: {e}")))?;
    let mut bpf = Vec::new();
    f.rewind()
        .and_then(|_| f.read_to_end(&mut bpf))
        .map_err(|e| Error::Other(format!("read the seccomp filter: {e}")))?;
    if bpf.is_empty() || bpf.len() % 8 != 0 {
        return Err(Error::Other(format!(
            "libseccomp gave a filter of {} bytes",
            bpf.len()
        )));
    }
    Ok(bpf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_profile_compiles_to_whole_instructions_and_differs_by_its_rules() {
        let base = json!({"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"],
            "syscalls": [{"names": ["read", "write", "no_such_call"], "action": "SCMP_ACT_ALLOW"},
                         {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                          "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}, {"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]},
                         {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
                          "args": [{"index": 0, "value": 2114060288, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]},
                         {"names": ["open"], "action": "SCMP_ACT_ERRNO"}]});
        let a = compile(&base).unwrap();
        assert_eq!(a.len() % 8, 0);
        assert_eq!(a, compile(&base).unwrap(), "deterministic");
        let mut more = base.clone();
        more["syscalls"][0]["names"] = json!(["read", "write", "mount"]);
        assert_ne!(a, compile(&more).unwrap());
    }

    #[test]
    fn notify_and_unknown_actions_are_refused() {
        assert!(matches!(
            compile(&json!({"defaultAction": "SCMP_ACT_NOTIFY"})),
            Err(Error::Unlike { .. })
        ));
        assert!(matches!(
            compile(&json!({"defaultAction": "SCMP_ACT_MAYBE"})),
            Err(Error::InvalidArgument(_))
        ));
    }
}
