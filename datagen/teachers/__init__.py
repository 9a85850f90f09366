"""The teacher: a monocular depth model whose map becomes each image's pseudo depth.

    runner.py   DepthTeacher (any transformers depth model, batched, on a GPU if any) and the oracle's
                wrapper; resolve_teacher picks one for a job
    zoo.py      the models datagen knows: output kind (disparity, relative depth, metric) and licence
    prep.py     each architecture's pre- and post-processing, as transformers' processors do it
    tiny.py     tiny random models of every architecture, saved like real weights (tests, dry runs)
    oracle.py   the synthetic world's teacher: the true depth with a real model's errors
"""
