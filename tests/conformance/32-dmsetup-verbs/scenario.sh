# dmsetup verbs and options: setgeometry and its range errors, rename --setuuid, -u/-j/-m
# selection, every info -c -o field, field help, --separator/--noheadings/--sort,
# ls --tree and its -o options, targets.
r() { dmsetup "$@"; echo "rc=$?"; }
echo "== setgeometry"
dmsetup create g --table "0 8192 linear $DISK1 0"
r setgeometry g 1 2 3 4
r setgeometry g 0 0 0 0
r setgeometry g 65535 255 63 8191
r setgeometry g 65536 1 1 0
r setgeometry g 1 256 1 0
r setgeometry g 1 1 256 0
r setgeometry g 1 1 1 8192
r setgeometry g 1 1 1 18446744073709551615
r setgeometry g x 1 1 0
r setgeometry g -1 1 1 0
r setgeometry g 1 1 1 -1
klog
echo "== rename --setuuid"
r rename g --setuuid first-uuid
r info -c -o name,uuid g
r rename g --setuuid second-uuid
klog
r rename g g2
r info -c -o name,uuid g2
r rename g2 g
echo "== selection"
dmsetup create h -u h-uuid --table "0 8192 linear $DISK2 0"
r info -u h-uuid
r info -c -o name -u h-uuid
r info -c -o name -u first-uuid
r info -u nosuch-uuid
r status -u h-uuid
r table --uuid first-uuid
r info -c -o name -j 253 -m 1
r info -c -o name -j 253 -m 0
r info -c -o name -j 253 -m 99
r info -c -o name -m 0
r remove -u h-uuid
dmsetup create h -u h-uuid --table "0 8192 linear $DISK2 0"
klog
echo "== fields"
dmsetup create s --table "0 4096 linear $(dev g) 0
4096 4096 linear $(dev h) 0"
for f in name mangled_name unmangled_name uuid mangled_uuid unmangled_uuid major minor attr open segments events devno blkdevname device_count devs_used devnos_used blkdevs_used device_ref_count names_using_dev devnos_using_dev blkdevname suspended readonly live_table inactive_table tables_loaded readahead read_ahead subsystem lv_name vg_name lv_layer; do
    echo "-- $f"
    r info -c -o $f s
done
r info -c -o nosuchfield s
r info -c -o help s
r info -c -o name,major,minor --separator , s g h
r info -c -o name,major,minor --separator '::' --noheadings s g h
r info -c -o name,minor --sort -minor
r info -c -o name,minor --sort name
r info -c -o name,minor -O -name
r info -c --noheadings
r info -c -o +devno s
echo "== tree"
r ls --tree
for o in device blkdevname devname active open rw uuid ascii compact notrunc inverted "ascii,inverted" "device,active,open,rw,uuid" "blkdevname,inverted,compact"; do
    echo "-- $o"
    r ls --tree -o $o
done
r ls -o devname
r ls -o blkdevname
r ls --target linear
r deps -o devname s
r deps -o blkdevname s
echo "== targets"
r targets
klog
dmsetup remove_all
