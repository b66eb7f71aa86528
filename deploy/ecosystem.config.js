// pm2's ecosystem file, for operators who run their validators with pm2 rather than systemd:
// the same commands and the same stop and restart behaviour as deploy/*.service (a test checks
// both against each other). The paths are the units' layout (docs/operations.md, "Running it
// with pm2"); change INSTALL_DIR and CONFIG_DIR if yours differ, and add one child per config.
//
//   pm2 start deploy/ecosystem.config.js            # the parent and child 1
//   pm2 start deploy/ecosystem.config.js --only validator-child-1
//   pm2 save && pm2 startup                         # start them again at boot
const INSTALL_DIR = "/opt/parent-child-validator";
const CONFIG_DIR = "/etc/parent-child-validator";
const STATE_DIR = "/var/lib/parent-child-validator";

function validator(name, config, env) {
  return {
    name,
    script: `${INSTALL_DIR}/validator.py`,
    interpreter: `${INSTALL_DIR}/.venv/bin/python`,
    // --wait-for-db: a PostgreSQL that is not up yet (boot) is waited for, not a failure.
    args: ["--config", `${CONFIG_DIR}/${config}`, "--wait-for-db"],
    cwd: INSTALL_DIR,
    env: { PYTHONUNBUFFERED: "1", ...env },
    autorestart: true,
    restart_delay: 10000,
    // Exit code 2 is an error the operator must fix (a bad config): not restarted.
    stop_exit_codes: [2],
    // pm2 stops a process with SIGINT, which the validator takes as it takes SIGTERM: it stops
    // in stages. Only the validator is signalled (systemd's KillMode=mixed): its evaluators
    // and its embedded PostgreSQL are its own to stop. SIGKILL follows after kill_timeout.
    treekill: false,
    kill_timeout: 120000,
  };
}

module.exports = {
  apps: [
    validator("validator-parent", "parent.toml", {
      XDG_RUNTIME_DIR: `${STATE_DIR}/parent/run`,
      BTCLI_TOKEN_SYMBOLS_CACHE: `${STATE_DIR}/parent/token_symbols.json`,
    }),
    validator("validator-child-1", "child-1.toml", {
      XDG_RUNTIME_DIR: `${STATE_DIR}/child-1/run`,
    }),
  ],
};
