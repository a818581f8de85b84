# Tables the kernel refuses at load (6.1): sizes at the sector_t limits, odd lengths; and
# the names dmsetup and the kernel refuse.  (Self-maps, cycles, "." and "..": 15-self-map-6.1.)
echo "== sizes"
dmsetup create big --table "0 18014398509481983 zero"; echo "rc=$?"
dmsetup table big
dmsetup remove big
dmsetup create big --table "0 18014398509481984 zero"; echo "rc=$?"
dmsetup create big --table "0 18446744073709551615 zero"; echo "rc=$?"
dmsetup create big --table "0 18446744073709551616 zero"; echo "rc=$?"
dmsetup create big --table "0 -8 zero"; echo "rc=$?"
dmsetup create big --table "0 0 zero"; echo "rc=$?"
dmsetup create big --table "8 8 zero"; echo "rc=$?"
klog
echo "== names"
dmsetup create "" --table "0 8 zero"; echo "rc=$?"
dmsetup create "a/b" --table "0 8 zero"; echo "rc=$?"
dmsetup create "n1234567890123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789012345678901234567" --table "0 8 zero"; echo "rc=$?"
dmsetup create "n12345678901234567890123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789012345678" --table "0 8 zero"; echo "rc=$?"
dmsetup ls | sort
klog
dmsetup remove_all
dmsetup ls
