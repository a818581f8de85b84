# dmsetup's own texts: help, an unknown command, each verb with missing or wrong arguments,
# and each verb on a device that does not exist (with the kernel's log lines).
r() { dmsetup "$@"; echo "rc=$?"; }
echo "== help"
r help
r
r nosuchcommand
r nosuchcommand x
echo "== no arguments"
for v in create load reload suspend resume clear remove rename message wait setgeometry mangle splitname; do
    echo "-- $v"
    r $v
done
echo "== wrong arguments"
r create a b c
r rename a
r rename a b c
r rename --setuuid
r rename a --setuuid u b
r message a
r message a 0
r message a x hello
r wait a 1 2
r setgeometry a 1 2 3
r setgeometry a 1 2 3 4 5
r version x
r targets x
klog
echo "== missing device"
for v in info status table deps suspend resume clear remove wait; do
    echo "-- $v"
    r $v nosuch
done
echo "-- load"
r load nosuch --table "0 8 zero"
echo "-- rename"
r rename nosuch other
r rename nosuch --setuuid some-uuid
echo "-- message"
r message nosuch 0 hello
echo "-- setgeometry"
r setgeometry nosuch 1 2 3 4
echo "-- columns"
r info -c nosuch
r info -c -o name,uuid nosuch
klog
dmsetup create t --table "0 8 zero"
r remove nosuch t
r info t
r status t nosuch
klog
dmsetup remove t
r ls
