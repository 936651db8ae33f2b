"""clearflow's stage functions. Importing the package sets the compute libraries' thread policy first
(tasks/core/threads.py): it only takes effect before torch loads."""

from tasks.core.threads import apply_env_policy

apply_env_policy()
