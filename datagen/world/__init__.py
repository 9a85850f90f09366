"""The synthetic world, where the true depth is known everywhere: the benchmark of the method.

    scenes.py   the scene families (street, room, nature, tabletop) rendered to exact depth and a mesh
    rig.py      the fixed KITTI-like target rig: camera, LiDAR mount, thinned HDL-64E, labels from
                accumulated scans
"""
