# Table lines at dmsetup's and the kernel's limits (what 14-table-refusals does not cover):
# target type names of 15, 16 and 17 bytes, malformed start/length fields, and a table
# file whose lines dmsetup refuses.
r() { dmsetup "$@"; echo "rc=$?"; }
r create t --table "0 8 abcdefghijklmno"
r create t --table "0 8 abcdefghijklmnop"
r create t --table "0 8 abcdefghijklmnopq"
klog
r create t --table "0 8"
r create t --table "x 8 zero"
r create t --table "0 x zero"
r create t --table "-1 8 zero"
r create t --table "0 8 zero
8 -8 zero"
r create t --table "0 18446744073709551615 zero"
r create t --table "0 8 zero
junk"
klog
printf '0 8 zero\n8 x zero\n' > /tmp/tab
r create t /tmp/tab
r create t --table "  0 8 zero  # a comment"
r table t
r load t --table "0 4 zero"
r table --inactive t
r remove t
klog
