"""Every random choice in the tests comes from a fixed seed: a seed drawn from the global random
state changes from run to run (and with the order tests run in), so a failure could not be
reproduced."""

import re

from paths import REPO_ROOT

# a seed, a Random or a Generator made from a draw of torch's or numpy's global state
_DRAWN_SEED = re.compile(r"(seed\s*=\s*int\(|Random\(\s*(int\()?|manual_seed\(\s*(int\()?)\s*"
                         r"(torch\.randint|torch\.rand|np\.random\.randint|numpy\.random\.randint)")


def test_no_test_draws_its_seed_from_the_global_random_state():
    found = []
    for path in sorted((REPO_ROOT / "tests").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if _DRAWN_SEED.search(line):
                found.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}")
    assert not found, "seeds drawn from the global random state:\n" + "\n".join(found)
