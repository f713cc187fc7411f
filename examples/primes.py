"""Count the primes in this task's slice of a range: a real CPU-bound array task.

Runs inside the sandbox with the system Python; reads MESH_TASK_INDEX and MESH_TASK_COUNT,
prints a line and writes its result as JSON for `--output` to collect.
"""

import json
import math
import os
import sys

LIMIT = int(sys.argv[1]) if len(sys.argv) > 1 else 2_000_000
index = int(os.environ["MESH_TASK_INDEX"])
count = int(os.environ["MESH_TASK_COUNT"])
start = LIMIT * index // count
stop = LIMIT * (index + 1) // count


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, math.isqrt(n) + 1, 2))


found = sum(1 for n in range(start, stop) if is_prime(n))
print(f"primes in [{start:,}, {stop:,}): {found:,}")
with open(f"primes-{index}.json", "w") as out:
    json.dump({"start": start, "stop": stop, "primes": found}, out)
