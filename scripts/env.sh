# Sourced by the scripts: OpenMPI settings for local runs on this machine class.
# Root needs both ALLOW flags; more ranks than cores needs oversubscription; ob1+vader (shared
# memory, CMA single copy) starts 3x faster than the default and keeps TCP out of local runs.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1
export OMPI_MCA_pml=${OMPI_MCA_pml:-ob1} OMPI_MCA_btl=${OMPI_MCA_btl:-self,vader}
# One compute thread per rank once ranks >= cores (the default lost 6-15% here).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
