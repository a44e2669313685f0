from sparsebench.report.page import main

main()
