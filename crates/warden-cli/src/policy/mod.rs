//! `warden policy test|eval|check`: the tools an OPA user expects, on the exact engine set-up
//! the proxy uses (`warden_core::policy::engine_for` / `Policy::compile`) and the decision
//! contract it enforces (`warden_core::decision::parse_output`).
//!
//! Exit codes: 0 ok, 1 a test failed or a decision has the wrong shape, 2 usage or load error.

mod check;
mod coverage;
mod eval;
mod load;
mod test;

use std::process::ExitCode;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Run the YAML cases (cases/*.yaml, on the RVM like the proxy) and the Rego tests
    /// (`test_*` rules of packages in *_test.rego files, on the interpreter).
    ///
    /// Prints failures, then a last line `N passed, N failed` (`, N errored` if any).
    /// Exit 0 when all pass, 1 when any fails or errors, 2 when the policy does not load.
    Test(test::TestArgs),
    /// Evaluate the entrypoint for one input and print the decision.
    ///
    /// Exit 0 on a valid decision, 1 if the decision has the wrong shape (or is undefined),
    /// 2 when the policy, input or data does not load.
    Eval(eval::EvalArgs),
    /// Compile the policy as the proxy does, say whether it runs on the RVM, and check that every
    /// sample input (the cases' inputs, else a built-in one) gives a decision of the right shape.
    ///
    /// Exit 0 ok, 1 naming a sample whose output has the wrong shape, 2 on load or config errors.
    Check(check::CheckArgs),
}

pub fn run(command: PolicyCommand) -> ExitCode {
    let result = match command {
        PolicyCommand::Test(args) => test::run(args),
        PolicyCommand::Eval(args) => eval::run(args),
        PolicyCommand::Check(args) => check::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}
