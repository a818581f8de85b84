"""Target types, one module each (installed as ``dmsim.targets``).

A module registers its target classes with :func:`dmsim.targets.base.register`; the
registry imports every module here the first time an unknown type is asked for, the way
the kernel loads ``dm-<type>`` on demand.
"""
