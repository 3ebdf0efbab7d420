"""Suite-wide settings.

OpenMP threads that busy-wait between parallel regions make tiny ops ~100x slower when the machine has
more runnable threads than cores (spawned gloo ranks on 2 cores, a shared CI box); passive waiting costs
nothing measurable for these test sizes. Set before torch is imported, and inherited by every process a
test spawns.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
