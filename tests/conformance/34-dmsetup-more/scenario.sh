# More dmsetup verbs and selections: wipe_table, mangle, -u/-j -m with other verbs,
# section fields (name_all, deps_all), target-version, splitname, help -c.
r() { dmsetup "$@"; echo "rc=$?"; }
dmsetup create a -u LVM-abc --table "0 8192 linear $DISK1 0"
dmsetup create vg-lv--x-layer --table "0 8 zero"
r mangle
r mangle a nosuch
r suspend -u LVM-abc
r info -c -o name,attr -u LVM-abc
r resume -j 253 -m 0
r status -u LVM-abc
r deps -j 253 -m 0
r message -u LVM-abc 0 hello
r setgeometry -u LVM-abc 1 1 1 0 x
r info -c -o name_all a
r info -c -o deps_all a
r info -c -o subsystem,vg_name,lv_name,lv_layer a vg-lv--x-layer
r wipe_table a
r table a
r status a
r target-version linear zero
r target-version nosuch
r splitname vg-lv--x-layer
r splitname vg-lv LVM
r ls --target zero
r table --target linear
r remove -u LVM-abc
r remove -j 253 -m 1
klog
r help -c
