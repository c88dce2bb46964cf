"""The fork benchmark's program: five forks generating at once, then one more generation.

With every answer taking the server 200 ms, the floor is two round trips (the five forks in
parallel, then the final gen): 0.4 s.
"""

import sglrun as sgl

FORKS = 5


@sgl.function
def fork_then_gen(s, topic: str):
    """Five ideas in parallel (one gen per fork), then a summary that reads all five."""
    s += "Give short ideas about " + topic + ".\n"
    forks = s.fork(FORKS)
    for index, branch in enumerate(forks):
        branch += f"Idea {index + 1}:" + sgl.gen("idea", max_tokens=8, stop="\n")
    forks.join()
    s += "Ideas: " + "; ".join(branch["idea"] for branch in forks) + "\n"
    s += "Best:" + sgl.gen("best", max_tokens=8, stop="\n")
