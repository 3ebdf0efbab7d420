"""One local slurm cluster (2 nodes on this host) for the whole session; see cluster.py.

Without slurm, munge and nss_wrapper installed (or not as root) the tests here skip, saying so, unless
INTERNLM2_EXPECT_SLURM=1 (CI), where they fail: a CI machine that lost its slurm must not pass quietly.
"""

import os

import pytest

from tests.slurm.cluster import LocalSlurmCluster, missing_requirements


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    why = missing_requirements()
    if why:
        if os.environ.get("INTERNLM2_EXPECT_SLURM") == "1":
            pytest.fail(f"INTERNLM2_EXPECT_SLURM=1 but no local slurm cluster can start: {why}")
        pytest.skip(f"no local slurm cluster: {why}")
    with LocalSlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2) as cluster:
        yield cluster
