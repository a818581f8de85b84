# Table-less devices (create --notable): what each verb prints for one, message's error.
r() { dmsetup "$@"; echo "rc=$?"; }
r create n --notable
r info n
r info -c n
r info -c -o name,attr,tables_loaded,segments n
r status n
r table n
r deps n
r ls
r ls --tree
r message n 0 hello
klog
r suspend n
r info n
r resume n
r info n
r load n --table "0 8 zero"
r info n
r table --inactive n
r clear n
r info n
r remove n
klog
r create u --notable -u some-uuid-1
r info u
r info -c -o name,uuid u
r remove u
r create v -n --table "0 8 zero"
r info v
r remove v
klog
